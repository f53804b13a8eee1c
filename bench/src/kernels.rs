//! `dejavu-bench kernels`: the sparse GEMV kernels against dense GEMV and against PyTorch
//! (cuBLAS GEMV, `index_select` + GEMV, a contiguous slice of the same rows), at the MLP
//! shapes of published OPT models, across densities.
//!
//! Two times per operation, both medians over samples of `--calls` back-to-back calls:
//! - `gpu_us`: device time per call without launch gaps. The GPU is first given a long
//!   job (the primer); while it runs, the host enqueues the calls, which then execute back
//!   to back. `(t(primer + calls) − t(primer)) / calls`. CubeCL's CUDA runtime has no
//!   device timers (it profiles by synchronising), hence this difference. The PyTorch
//!   peer measures the same thing with CUDA events after `torch.cuda._sleep`.
//! - `stream_us`: wall time per call of the same loop without a primer: what a decode
//!   loop without CUDA graphs pays when the host's launch cost exceeds the kernel's.
//!
//! Weights are rotated over enough copies that one cycle touches `--rotate-mb` of
//! distinct bytes, so the 50 MB L2 of an H100 cannot serve repeats.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use burn::prelude::*;
use burn::tensor::{DType, Distribution, TensorData};
use burn_cubecl::CubeRuntime;
use dejavu_kernels::checks::{
    check_attention, check_attention_out_proj, check_block_cols_gemv, check_gemvs, check_gated_rows_gemv, check_kv_append, check_layer_norm, check_qkv_lazy, check_norm_predict, check_norms_ahead, check_predicted_mlp, check_predictor_kernels, check_selection, check_argmax, check_embed_rows, fresh_seed, Case,
    Cube, Outcome, Poisoned,
};
use dejavu_kernels::cube::LaunchConfig;
use dejavu_kernels::{
    accumulate_transposed_gemv, gather_rows_gemv, gather_rows_transposed_gemv, gemv, layer_norm, norm_predict, predicted_rows_gemv, select_above_threshold, sparse_mlp, sparse_mlp_accumulate,
    transposed_gemv, Activation, HeadSelect,
};
use dejavu_model::OptConfig;
use rand::prelude::*;
use rand::rngs::StdRng;
use serde::Serialize;
use serde_json::Value;

use crate::primer::Primer;
use crate::report::{commit, device_name, median, read_json, run_peer_script, write_benchmark};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CubeKind {
    /// CUDA through CubeCL (`CubeBackend<CudaRuntime>`, no fusion)
    Cuda,
    /// wgpu through CubeCL (Vulkan; lavapipe without a GPU: a smoke test, not a benchmark)
    Wgpu,
}

#[derive(clap::Args, Debug, Clone)]
pub struct KernelArgs {
    #[arg(long, value_enum, default_value = "cuda")]
    backend: CubeKind,
    /// Model shapes (hidden d, ffn 4d): opt-1.3b, opt-6.7b, opt-13b, opt-30b, ...
    #[arg(long, value_delimiter = ',', default_value = "opt-6.7b,opt-13b,opt-30b")]
    models: Vec<String>,
    /// Fractions of the ffn neurons selected
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.1,0.25,0.5,0.8,1.0")]
    densities: Vec<f64>,
    /// Storage type (accumulation is always f32)
    #[arg(long, value_enum, default_value = "f16")]
    dtype: StorageKind,
    /// Predictor ranks for the predictor + selection timing
    #[arg(long, value_delimiter = ',', default_value = "128,256,1000")]
    ranks: Vec<usize>,
    /// Context lengths for the selected-head attention timing (`--contexts` with no value:
    /// skip attention)
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "128,512,1024")]
    contexts: Vec<usize>,
    /// Fractions of the heads selected, for the attention timing
    #[arg(long, value_delimiter = ',', default_value = "0.5,1.0")]
    head_densities: Vec<f64>,
    /// Back-to-back calls per timed sample
    #[arg(long, default_value_t = 100)]
    calls: usize,
    /// Timed samples per operation (after a warm-up sample)
    #[arg(long, default_value_t = 11)]
    samples: usize,
    /// Distinct weight bytes one rotation cycle touches (MB), to defeat the L2 cache
    #[arg(long, default_value_t = 256)]
    rotate_mb: usize,
    /// Size of the primer tensor (MB, f32) whose passes keep the GPU busy while calls are
    /// enqueued; it also gives the copy bandwidth
    #[arg(long, default_value_t = 1024)]
    primer_mb: usize,
    /// Also time grid-shape variants of the gathered kernels and of fc2ᵀ over every row
    /// with 90% of its inputs zero, as decode's gated fc1 leaves them (at the first model,
    /// density 0.1), the gathered ones checked first when --check is given
    #[arg(long)]
    tune: bool,
    /// First check every kernel against host loops at these shapes (outputs poisoned)
    #[arg(long)]
    check: bool,
    /// Read the PyTorch peer's results from this JSON (bench/peers/torch_kernels.py)
    /// instead of running it
    #[arg(long, value_name = "FILE")]
    peer_json: Option<PathBuf>,
    /// Python that runs bench/peers/torch_kernels.py; empty to skip the peer
    #[arg(long, default_value = "python3")]
    peer_python: String,
    /// Where to write the JSON [default: bench/results/kernels-<commit>.json]
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    F16,
    F32,
}

impl StorageKind {
    fn dtype(self) -> DType {
        match self {
            StorageKind::F16 => DType::F16,
            StorageKind::F32 => DType::F32,
        }
    }
}

/// One timed operation.
#[derive(Debug, Clone, Serialize)]
pub struct Timed {
    pub model: String,
    pub op: String,
    pub density: Option<f64>,
    pub k: Option<usize>,
    /// Weight bytes the operation must read (selected rows only).
    pub weight_bytes: f64,
    pub gpu_us: f64,
    pub gpu_samples_us: Vec<f64>,
    pub stream_us: f64,
    pub gpu_gbs: f64,
}

struct Timer<B: Backend> {
    primer: Primer<B>,
    calls: usize,
    samples: usize,
}

impl<B: Backend> Timer<B> {
    fn wall<F: FnMut(usize)>(&self, f: &mut F, prime: usize) -> anyhow::Result<f64> {
        self.primer.sync()?;
        let t = Instant::now();
        self.primer.prime(prime);
        for i in 0..self.calls {
            f(i);
        }
        self.primer.sync()?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// (gpu µs per call: median and samples, stream µs per call).
    fn time<F: FnMut(usize)>(&self, mut f: F) -> anyhow::Result<(f64, Vec<f64>, f64)> {
        // Warm-up: compilation of any new kernel variant happens here.
        self.wall(&mut f, 0)?;
        let mut stream = Vec::new();
        for _ in 0..self.samples.min(5) {
            stream.push(self.wall(&mut f, 0)?);
        }
        let stream_s = median(&mut stream);
        // One primer pass, timed, sizes the primer: it must outlast the host's enqueueing.
        let mut one = Vec::new();
        for _ in 0..3 {
            one.push(self.primer.seconds(1)?);
        }
        let passes = ((2.0 * stream_s / median(&mut one)).ceil() as usize + 2).min(400);
        let mut gpu = Vec::new();
        for _ in 0..self.samples {
            let primer_only = self.primer.seconds(passes)?;
            let both = self.wall(&mut f, passes)?;
            gpu.push((both - primer_only).max(0.0) / self.calls as f64 * 1e6);
        }
        let gpu_median = median(&mut gpu.clone());
        Ok((gpu_median, gpu, stream_s / self.calls as f64 * 1e6))
    }
}

fn sorted_indices(rng: &mut StdRng, n: usize, k: usize) -> Vec<i32> {
    let mut all: Vec<i32> = (0..n as i32).collect();
    all.shuffle(rng);
    let mut idx: Vec<i32> = all.into_iter().take(k).collect();
    idx.sort_unstable();
    idx
}

/// How many copies of a buffer set to rotate over so that one cycle reads `--rotate-mb`
/// of distinct bytes, when a call reads `bytes_per_call` (at least 2, at most `max`).
fn rotation_copies(args: &KernelArgs, bytes_per_call: f64, max: usize) -> usize {
    ((args.rotate_mb as f64 * 1e6) / bytes_per_call).ceil().clamp(2.0, max as f64) as usize
}

fn bytes_per_value(dtype: DType) -> f64 {
    dtype.size() as f64
}

/// Two tensors of one shape: predictor factors, or a key and a value cache.
type Pair<B, const D: usize> = (Tensor<B, D>, Tensor<B, D>);
/// Stacked QKV weight `[3d, d]` and bias, transposed `out_proj` `[d, d]` and bias.
type AttentionWeights<B> = (Tensor<B, 2>, Tensor<B, 1>, Tensor<B, 2>, Tensor<B, 1>);
/// `out_proj` (row-major) with a key cache and a value cache.
type OutProjAndCaches<B> = (Tensor<B, 2>, Pair<B, 4>);

struct MlpWeights<B: Backend> {
    /// fc1 in PyTorch layout `[ffn, d]`.
    w1: Tensor<B, 2>,
    b1: Tensor<B, 1>,
    /// fc2 transposed `[ffn, d]` (each neuron one contiguous row).
    w2_t: Tensor<B, 2>,
    /// fc2 in PyTorch layout `[d, ffn]`, for our dense GEMV baseline.
    w2: Tensor<B, 2>,
    b2: Tensor<B, 1>,
}

fn random<B: Backend, const D: usize>(shape: [usize; D], dtype: DType, device: &B::Device) -> Tensor<B, D> {
    Tensor::<B, D>::random(shape, Distribution::Uniform(-0.05, 0.05), device).cast(dtype)
}

fn measure_model<R: CubeRuntime>(
    args: &KernelArgs,
    timer: &Timer<Cube<R>>,
    name: &str,
    config: &OptConfig,
    out: &mut Vec<Timed>,
) -> anyhow::Result<()> {
    type B<R> = Cube<R>;
    let device = &timer.primer.device;
    let dtype = args.dtype.dtype();
    let bpv = bytes_per_value(dtype);
    let (d, ffn) = (config.hidden_size, config.ffn_dim);
    let matrix_bytes = (d * ffn) as f64 * bpv;
    let min_density = args.densities.iter().cloned().fold(1.0, f64::min).max(1e-3);
    // Enough copies that a rotation cycle of the sparsest MLP touches --rotate-mb.
    let copies = rotation_copies(args, 2.0 * matrix_bytes * min_density, 64);
    eprintln!("{name}: d {d} ffn {ffn}, {copies} weight copies of {:.0} MB each", 3.0 * matrix_bytes / 1e6);
    let weights: Vec<MlpWeights<B<R>>> = (0..copies)
        .map(|_| MlpWeights {
            w1: random([ffn, d], dtype, device),
            // Positive fc1 biases: every selected neuron stays active after ReLU, so the
            // sparse MLP reads all of its K fc2 rows (the kernel skips rows whose hidden
            // value is 0, which would flatter it by an amount random weights decide).
            b1: Tensor::<B<R>, 1>::random([ffn], Distribution::Uniform(0.5, 1.0), device).cast(dtype),
            w2_t: random([ffn, d], dtype, device),
            w2: random([d, ffn], dtype, device),
            b2: random([d], dtype, device),
        })
        .collect();
    let x = random::<B<R>, 2>([1, d], dtype, device);
    let h_full = Tensor::<B<R>, 2>::random([1, ffn], Distribution::Uniform(0.1, 1.0), device).cast(dtype);
    let mut rng = StdRng::seed_from_u64(7);

    // Dense baselines: our own GEMV over every row.
    let t = timer.time(|i| {
        let w = &weights[i % copies];
        let _ = gemv(w.w1.clone(), x.clone(), Some(w.b1.clone()), Activation::Relu).unwrap();
    })?;
    push_timed(out, name, "ours_dense_fc1", None, None, matrix_bytes, t);
    let t = timer.time(|i| {
        let w = &weights[i % copies];
        let _ = gemv(w.w2.clone(), h_full.clone(), Some(w.b2.clone()), Activation::Identity).unwrap();
    })?;
    push_timed(out, name, "ours_dense_fc2", None, None, matrix_bytes, t);
    let t = timer.time(|i| {
        let w = &weights[i % copies];
        let h = gemv(w.w1.clone(), x.clone(), Some(w.b1.clone()), Activation::Relu).unwrap();
        let _ = gemv(w.w2.clone(), h, Some(w.b2.clone()), Activation::Identity).unwrap();
    })?;
    push_timed(out, name, "ours_dense_mlp", None, None, 2.0 * matrix_bytes, t);

    for &density in &args.densities {
        let k = ((density * ffn as f64).round() as usize).clamp(1, ffn);
        let idx_host = sorted_indices(&mut rng, ffn, k);
        let idx = Tensor::<B<R>, 1, Int>::from_data(TensorData::new(idx_host, [k]), device);
        let h = Tensor::<B<R>, 2>::random([1, k], Distribution::Uniform(0.1, 1.0), device).cast(dtype);
        let rows_bytes = (k * d) as f64 * bpv;
        let t = timer.time(|i| {
            let w = &weights[i % copies];
            let _ = gather_rows_gemv(w.w1.clone(), idx.clone(), x.clone(), Some(w.b1.clone()), Activation::Relu).unwrap();
        })?;
        push_timed(out, name, "ours_fc1_gather", Some(density), Some(k), rows_bytes, t);
        let t = timer.time(|i| {
            let w = &weights[i % copies];
            let _ = gather_rows_transposed_gemv(w.w2_t.clone(), idx.clone(), h.clone(), Some(w.b2.clone())).unwrap();
        })?;
        push_timed(out, name, "ours_fc2t_gather", Some(density), Some(k), rows_bytes, t);
        let t = timer.time(|i| {
            let w = &weights[i % copies];
            let _ = sparse_mlp(x.clone(), w.w1.clone(), w.b1.clone(), w.w2_t.clone(), w.b2.clone(), idx.clone()).unwrap();
        })?;
        push_timed(out, name, "ours_sparse_mlp", Some(density), Some(k), 2.0 * rows_bytes, t);
        // The same MLP added into an f32 accumulator (a residual stream kept in f32): fc2's
        // split sums go in with f32 atomics, so no second pass. Each call adds into the
        // previous call's result, in place.
        let mut acc = Some(Tensor::<B<R>, 2>::zeros([1, d], device).cast(DType::F32));
        let t = timer.time(|i| {
            let w = &weights[i % copies];
            let a = acc.take().expect("the accumulator is put back after each call");
            acc = Some(accumulate_transposed_gemv(a, w.w2_t.clone(), Some((idx.clone(), 1)), h.clone(), Some(w.b2.clone())).unwrap());
        })?;
        push_timed(out, name, "ours_fc2t_gather_accumulate", Some(density), Some(k), rows_bytes, t);
        let t = timer.time(|i| {
            let w = &weights[i % copies];
            let a = acc.take().expect("the accumulator is put back after each call");
            let mlp = dejavu_kernels::MlpWeights { w1: w.w1.clone(), b1: Some(w.b1.clone()), w2_t: w.w2_t.clone(), b2: Some(w.b2.clone()) };
            acc = Some(sparse_mlp_accumulate(a, x.clone(), mlp, idx.clone()).unwrap());
        })?;
        push_timed(out, name, "ours_sparse_mlp_accumulate", Some(density), Some(k), 2.0 * rows_bytes, t);
    }

    // Predictor (two low-rank GEMVs) + selection of ~10% by threshold, per layer.
    let logits = random::<B<R>, 2>([1, ffn], DType::F32, device).cast(dtype);
    let mut values: Vec<f32> = logits.clone().cast(DType::F32).into_data().convert::<f32>().into_vec().unwrap();
    values.sort_by(f32::total_cmp);
    let threshold = values[(0.9 * ffn as f64) as usize];
    let t = timer.time(|_| {
        let _ = select_above_threshold(logits.clone(), threshold, ffn).unwrap();
    })?;
    push_timed(out, name, "ours_select", Some(0.1), None, 0.0, t);
    for &rank in &args.ranks {
        let pcopies = copies.max(4);
        let preds: Vec<Pair<B<R>, 2>> = (0..pcopies)
            // The second factor stored `[rank, ffn]`: the transposed kernel then reads
            // long contiguous rows, where a `[ffn, rank]` GEMV would give each output a
            // row of only `rank` values.
            .map(|_| (random([rank, d], dtype, device), random([rank, ffn], dtype, device)))
            .collect();
        let bytes = ((rank * d) + (ffn * rank)) as f64 * bpv;
        let t = timer.time(|i| {
            let (a, b) = &preds[i % pcopies];
            let z = gemv(a.clone(), x.clone(), None, Activation::Identity).unwrap();
            let logits = transposed_gemv(b.clone(), z, None).unwrap();
            let _ = select_above_threshold(logits, 0.0, ffn).unwrap();
        })?;
        push_timed(out, name, &format!("ours_predictor_select_r{rank}"), None, None, bytes, t);
        measure_fused_predictors::<R>(timer, name, config, rank, &weights, out)?;
    }
    Ok(())
}

/// The decode step's form of a layer's predictors and selections, f32 predictors as the
/// decode path holds them: the two first factors ride in the LayerNorms' launches
/// (`norm_predict`; the attention one also scores and selects this layer's heads) and the
/// MLP predictor's second factor with its threshold inside fc1 (`predicted_rows_gemv`). Its
/// cost is what those launches take beyond the LayerNorm alone (twice) and beyond fc1 over
/// a ready index list of the same rows; `fused_predictor_select_r{rank}` is that sum, the
/// per-layer number issue 4's predictor + selection goal asks about.
fn measure_fused_predictors<R: CubeRuntime>(
    timer: &Timer<Cube<R>>,
    name: &str,
    config: &OptConfig,
    rank: usize,
    weights: &[MlpWeights<Cube<R>>],
    out: &mut Vec<Timed>,
) -> anyhow::Result<()> {
    type B<R> = Cube<R>;
    let device = &timer.primer.device;
    let dtype = weights[0].w1.dtype();
    let bpv = bytes_per_value(dtype);
    let (d, ffn, heads) = (config.hidden_size, config.ffn_dim, config.num_attention_heads);
    let (copies, pcopies) = (weights.len(), weights.len().max(4));
    let eps = 1e-5;
    let x = random::<B<R>, 2>([1, d], dtype, device);
    let gamma = Tensor::<B<R>, 1>::random([d], Distribution::Uniform(0.5, 1.5), device);
    let beta = Tensor::<B<R>, 1>::random([d], Distribution::Uniform(-0.1, 0.1), device);
    // The first factors' output for this token (f32), as the previous layer's norm_predict left it.
    let h = Tensor::<B<R>, 2>::random([1, rank], Distribution::Uniform(-1.0, 1.0), device);
    let h_host: Vec<f32> = h.clone().into_data().convert::<f32>().into_vec().expect("f32");
    // Per copy: the MLP predictor's factors [rank, d] and [ffn, rank], the head predictor's.
    let preds: Vec<[Tensor<B<R>, 2>; 4]> = (0..pcopies)
        .map(|_| [random([rank, d], DType::F32, device), random([ffn, rank], DType::F32, device), random([rank, d], DType::F32, device), random([heads, rank], DType::F32, device)])
        .collect();
    // Each copy's neuron logits on the host; one threshold keeping ~10% of copy 0's, and
    // per copy the rows above it (what fc1 over a ready list reads instead).
    let logits: Vec<Vec<f32>> = preds
        .iter()
        .map(|p| {
            let up: Vec<f32> = p[1].clone().into_data().convert::<f32>().into_vec().expect("f32");
            up.chunks_exact(rank).map(|row| row.iter().zip(&h_host).map(|(a, b)| a * b).sum()).collect()
        })
        .collect();
    let mut sorted = logits[0].clone();
    sorted.sort_by(f32::total_cmp);
    let threshold = sorted[(0.9 * ffn as f64) as usize];
    let lists: Vec<Tensor<B<R>, 1, Int>> = logits
        .iter()
        .map(|l| {
            let idx: Vec<i32> = (0..ffn).filter(|&j| l[j] > threshold).map(|j| j as i32).collect();
            let k = idx.len();
            Tensor::from_data(TensorData::new(idx, [k]), device)
        })
        .collect();
    let k = lists[0].dims()[0];
    let density = k as f64 / ffn as f64;

    let ln = timer.time(|_| {
        let _ = layer_norm(x.clone(), gamma.clone(), beta.clone(), eps).unwrap();
    })?;
    push_timed(out, name, "ours_layer_norm", None, None, d as f64 * bpv, ln.clone());
    let np_mlp = timer.time(|i| {
        let p = &preds[i % pcopies];
        let _ = norm_predict(x.clone(), gamma.clone(), beta.clone(), eps, p[0].clone(), None).unwrap();
    })?;
    push_timed(out, name, &format!("ours_norm_predict_mlp_r{rank}"), None, None, (rank * d * 4) as f64, np_mlp.clone());
    let np_heads = timer.time(|i| {
        let p = &preds[i % pcopies];
        let select = HeadSelect { up: p[3].clone(), h: h.clone(), threshold: 0.0, capacity: heads };
        let _ = norm_predict(x.clone(), gamma.clone(), beta.clone(), eps, p[2].clone(), Some(select)).unwrap();
    })?;
    push_timed(out, name, &format!("ours_norm_predict_heads_r{rank}"), None, None, ((rank * d + heads * rank) * 4) as f64, np_heads.clone());
    // Rows pair a weight copy with a predictor copy the same way in both timings.
    let predicted = timer.time(|i| {
        let (w, p) = (&weights[i % copies], &preds[i % pcopies]);
        let _ = predicted_rows_gemv(w.w1.clone(), x.clone(), Some(w.b1.clone()), Activation::Relu, p[1].clone(), h.clone(), threshold).unwrap();
    })?;
    push_timed(out, name, &format!("ours_predicted_fc1_r{rank}"), Some(density), Some(k), (ffn * rank * 4) as f64 + (k * d) as f64 * bpv, predicted.clone());
    let listed = timer.time(|i| {
        let w = &weights[i % copies];
        let _ = gather_rows_gemv(w.w1.clone(), lists[i % pcopies].clone(), x.clone(), Some(w.b1.clone()), Activation::Relu).unwrap();
    })?;
    push_timed(out, name, &format!("ours_fc1_gather_predicted_rows_r{rank}"), Some(density), Some(k), (k * d) as f64 * bpv, listed.clone());
    // Each timing's median GPU µs and its stream µs, beyond the launches without the work.
    let beyond = |pick: fn(&(f64, Vec<f64>, f64)) -> f64| (pick(&np_mlp) - pick(&ln)) + (pick(&np_heads) - pick(&ln)) + (pick(&predicted) - pick(&listed));
    let bytes = ((2 * rank * d + heads * rank + ffn * rank) * 4) as f64;
    push_timed(out, name, &format!("ours_fused_predictor_select_r{rank}"), Some(density), Some(k), bytes, (beyond(|t| t.0), Vec::new(), beyond(|t| t.2)));

    // The whole MLP of a decode step from the predictor's first factor to the residual:
    // `predicted_mlp` (predictor, selection, fc1 and fc2's split sums in one launch, then
    // the splits' sum with bias and residual) with its default cubes and other neurons
    // and units per cube, against the separate kernels the decode step ran before (gated
    // fc1, then fc2's two passes: three launches).
    let residual = random::<B<R>, 2>([1, d], dtype, device);
    let bytes = (ffn * rank * 4) as f64 + 2.0 * (k * d) as f64 * bpv;
    let prim = |t: Tensor<B<R>, 2>| t.into_primitive().tensor();
    let prim1 = |t: Tensor<B<R>, 1>| t.into_primitive().tensor();
    let default = LaunchConfig::default();
    for (rows, threads) in [(64, 512), (32, 256), (64, 256), (128, 512), (128, 1024), (256, 1024)] {
        let cfg = LaunchConfig { fused_mlp_rows: rows, fused_mlp_threads: threads, ..default };
        let label = if cfg == default { String::new() } else { format!("_split{rows}_units{threads}") };
        let t = timer.time(|i| {
            let (w, p) = (&weights[i % copies], &preds[i % pcopies]);
            let _ = dejavu_kernels::cube::predicted_mlp(
                prim(w.w1.clone()), Some(prim1(w.b1.clone())), prim(w.w2_t.clone()), Some(prim1(w.b2.clone())),
                prim(x.clone()), Some(prim(residual.clone())), prim(p[1].clone()), prim(h.clone()), threshold, &cfg,
            );
        })?;
        push_timed(out, name, &format!("ours_predicted_mlp{label}_r{rank}"), Some(density), Some(k), bytes, t);
    }
    let separate = timer.time(|i| {
        let (w, p) = (&weights[i % copies], &preds[i % pcopies]);
        let hidden = predicted_rows_gemv(w.w1.clone(), x.clone(), Some(w.b1.clone()), Activation::Relu, p[1].clone(), h.clone(), threshold).unwrap();
        let _ = dejavu_kernels::residual_transposed_gemv(residual.clone(), w.w2_t.clone(), None, hidden, Some(w.b2.clone())).unwrap();
    })?;
    push_timed(out, name, &format!("ours_predicted_mlp_separate_r{rank}"), Some(density), Some(k), bytes, separate);
    Ok(())
}

/// Grid-shape variants of the two gathered kernels at one shape and density.
fn tune<R: CubeRuntime>(args: &KernelArgs, timer: &Timer<Cube<R>>, out: &mut Vec<Timed>) -> anyhow::Result<Vec<Outcome>> {
    let name = &args.models[0];
    let config = named(name)?;
    let device = &timer.primer.device;
    let dtype = args.dtype.dtype();
    let (d, ffn) = (config.hidden_size, config.ffn_dim);
    let density = 0.1;
    let k = (density * ffn as f64).round() as usize;
    let matrix_bytes = (d * ffn) as f64 * bytes_per_value(dtype);
    let copies = rotation_copies(args, matrix_bytes * density, 64);
    let ws: Vec<Tensor<Cube<R>, 2>> = (0..copies).map(|_| random([ffn, d], dtype, device)).collect();
    let bias1 = random::<Cube<R>, 1>([ffn], dtype, device);
    let bias2 = random::<Cube<R>, 1>([d], dtype, device);
    let x = random::<Cube<R>, 2>([1, d], dtype, device);
    let h = Tensor::<Cube<R>, 2>::random([1, k], Distribution::Uniform(0.1, 1.0), device).cast(dtype);
    let mut rng = StdRng::seed_from_u64(11);
    let idx = Tensor::<Cube<R>, 1, Int>::from_data(TensorData::new(sorted_indices(&mut rng, ffn, k), [k]), device);
    // What decode's fc2 reads after the gated fc1: every row's h, `density` of them nonzero
    // (the transposed GEMV skips the zeros), no index list.
    let h_values: Vec<f32> = (0..ffn).map(|_| if rng.random_bool(density) { rng.random_range(0.1f32..1.0) } else { 0.0 }).collect();
    let h_all = Tensor::<Cube<R>, 2>::from_data(TensorData::new(h_values, [1, ffn]), device).cast(dtype);
    // A dense decode's fc2 input: half the rows zero (random weights after ReLU).
    let h_half_values: Vec<f32> = (0..ffn).map(|_| if rng.random_bool(0.5) { rng.random_range(0.1f32..1.0) } else { 0.0 }).collect();
    let h_half = Tensor::<Cube<R>, 2>::from_data(TensorData::new(h_half_values, [1, ffn]), device).cast(dtype);
    let prim = |t: Tensor<Cube<R>, 2>| t.into_primitive().tensor();
    // Attention at half the heads over 192 positions (a decode step of prompt 128), out_proj
    // `[d, d]` row-major; rotated like the MLP weights.
    let n_heads = config.num_attention_heads;
    let hd = d / n_heads;
    let (attn_len, attn_cap) = (192usize, 256usize);
    let slots = n_heads / 2;
    let attn_heads = Tensor::<Cube<R>, 1, Int>::from_data(TensorData::new((0..slots as i32).map(|h| 2 * h).collect::<Vec<i32>>(), [slots]), device);
    let attn_q = random::<Cube<R>, 2>([1, slots * hd], dtype, device);
    let attn_copies = rotation_copies(args, (d * d) as f64 * bytes_per_value(dtype) * 0.5, 16);
    let attn_w: Vec<OutProjAndCaches<Cube<R>>> = (0..attn_copies)
        .map(|_| (random([d, d], dtype, device), (random([1, n_heads, attn_cap, hd], dtype, device), random([1, n_heads, attn_cap, hd], dtype, device))))
        .collect();
    let base = LaunchConfig::default();
    let mut variants = Vec::new();
    for rows_per_cube in [4, 8] {
        variants.push(("fc1", LaunchConfig { rows_per_cube, ..base }));
    }
    // fc2ᵀ: the skipping kernel's default, then the compacting one's splits and grids.
    // (A gathered fc2 always takes the skipping kernel.)
    for (cols_per_cube, lanes_k, rows_per_lane) in [(32, 8, 8), (32, 16, 8), (16, 16, 8)] {
        variants.push(("fc2", LaunchConfig { cols_per_cube, lanes_k, rows_per_lane, ..base }));
    }
    // The gathered fc2ᵀ adding into an f32 accumulator with atomics: with no second pass
    // to feed, more splits (fewer rows per lane) cost only atomics.
    // Wider column blocks read longer runs of each row (a 6.7B row is 512 vectors: 512
    // columns a cube read it whole, as fc1's lane groups do).
    for (cols_per_cube, lanes_k, rows_per_lane) in [
        (32, 8, 8), (32, 8, 4), (32, 8, 2), (32, 16, 4), (64, 4, 4), (16, 16, 4),
        (128, 8, 4), (128, 4, 8), (256, 4, 4), (256, 2, 8), (512, 2, 4), (512, 2, 8), (512, 1, 8),
    ] {
        variants.push(("fc2acc", LaunchConfig { cols_per_cube, lanes_k, rows_per_lane, ..base }));
    }
    for (cols_per_cube, lanes_k, rows_per_lane) in [(128, 8, 4), (256, 4, 4), (512, 2, 8)] {
        variants.push(("fc2", LaunchConfig { cols_per_cube, lanes_k, rows_per_lane, ..base }));
    }
    // fc2ᵀ over every row (the gated fc1's output) added into an f32 accumulator: the
    // compacting kernel with atomic adds, by rows per split.
    for (cols_per_cube, lanes_k) in [(32, 8), (64, 4), (16, 16)] {
        for accumulate_compact_rows in [128, 256, 512, 1024, 2048] {
            variants.push(("fc2skipacc", LaunchConfig { cols_per_cube, lanes_k, accumulate_compact_rows, ..base }));
        }
    }
    // The same over an input with half its rows live (a dense fc1's ReLU on random
    // weights: the dense layers of the e2e step's sparse model), by rows per split.
    for accumulate_compact_rows in [128, 256, 512, 1024] {
        variants.push(("fc2halfacc", LaunchConfig { accumulate_compact_rows, ..base }));
    }
    // Attention with out_proj into an f32 residual, by rows of out_proj per cube (0: the
    // attention kernel, then block_cols_gemv).
    for attention_out_rows in [0, 64, 128, 256, 512] {
        variants.push(("attnout", LaunchConfig { attention_out_rows, attention_round_positions: 0, ..base }));
    }
    // Its attention by the online softmax, by positions a round.
    for (attention_out_rows, attention_round_positions) in [(256, 2), (256, 4), (256, 8), (128, 4), (128, 8)] {
        variants.push(("attnout", LaunchConfig { attention_out_rows, attention_round_positions, ..base }));
    }
    // With 512 units a cube: 512 rows (half the cubes recomputing a head's attention, the
    // same loads in flight a unit) or 256.
    for (attention_out_rows, attention_round_positions) in [(512, 0), (512, 4), (512, 8), (256, 4), (256, 8)] {
        variants.push(("attnout", LaunchConfig { attention_out_rows, attention_round_positions, attention_out_threads: 512, ..base }));
    }
    // The same two accumulating launches writing the LayerNorm of the finished residual
    // from their last cube (`--fused-norms`), against the plain ones above.
    for norm_plain_reads in [false, true] {
        variants.push(("attnoutnorm", LaunchConfig { norm_plain_reads, ..base }));
        for accumulate_compact_rows in [1024, 2048] {
            variants.push(("fc2skipaccnorm", LaunchConfig { accumulate_compact_rows, norm_plain_reads, ..base }));
        }
    }
    for kernel in ["fc2skip", "fc2half"] {
        variants.push((kernel, LaunchConfig { compact_rows: 0, ..base }));
        for (cols_per_cube, lanes_k) in [(32, 8), (16, 16), (64, 4)] {
            for compact_rows in [64, 128, 256, 512] {
                variants.push((kernel, LaunchConfig { cols_per_cube, lanes_k, compact_rows, ..base }));
            }
        }
    }
    let mut outcomes = Vec::new();
    let mut checked: Vec<LaunchConfig> = Vec::new();
    for (kernel, cfg) in variants {
        // Each grid shape checked once, on a quarter of the rows (host loops are slow).
        if args.check && !checked.contains(&cfg) {
            checked.push(cfg);
            let case = Case { rows: ffn / 4, d, k: ffn / 40, batch: 1, dtype, seed: fresh_seed() };
            outcomes.extend(check_gemvs::<Cube<R>, _>(&Poisoned(cfg), device, &case));
        }
        // The LayerNorm the `...norm` variants apply (its counter shared by their calls).
        let with_norm = kernel.ends_with("norm");
        let done = dejavu_kernels::NormAfter::<Cube<R>>::counter(device);
        let norm = || {
            with_norm.then(|| dejavu_kernels::cube::NormArgs {
                gamma: Tensor::<Cube<R>, 1>::ones([d], (device, DType::F32)).into_primitive().tensor(),
                beta: Tensor::<Cube<R>, 1>::zeros([d], (device, DType::F32)).into_primitive().tensor(),
                eps: 1e-5,
                done: done.clone().into_primitive(),
            })
        };
        let t = if kernel == "attnout" || kernel == "attnoutnorm" {
            let mut acc = Some(prim(Tensor::<Cube<R>, 2>::zeros([1, d], device).cast(DType::F32)));
            timer.time(|i| {
                let (w, (kc, vc)) = &attn_w[i % attn_copies];
                let a = acc.take().expect("the accumulator is put back after each call");
                let p4 = |t: &Tensor<Cube<R>, 4>| t.clone().into_primitive().tensor();
                acc = Some(dejavu_kernels::cube::attention_out_proj_accumulate(
                    prim(attn_q.clone()), attn_heads.clone().into_primitive(), p4(kc), p4(vc), attn_len, 0.088,
                    prim(w.clone()), Some(bias2.clone().into_primitive().tensor()), a, norm(), &cfg,
                ).0);
            })?
        } else if kernel == "fc2acc" || kernel == "fc2skipacc" || kernel == "fc2skipaccnorm" || kernel == "fc2halfacc" {
            // The gathered rows, or every row of the gated fc1's output (or of the half-live one).
            let (rows_idx, h_in) = match kernel {
                "fc2acc" => (Some(&idx), &h),
                "fc2halfacc" => (None, &h_half),
                _ => (None, &h_all),
            };
            let mut acc = Some(prim(Tensor::<Cube<R>, 2>::zeros([1, d], device).cast(DType::F32)));
            timer.time(|i| {
                let a = acc.take().expect("the accumulator is put back after each call");
                acc = Some(dejavu_kernels::cube::rows_transposed_gemv_accumulate(
                    prim(ws[i % copies].clone()), rows_idx.map(|i| i.clone().into_primitive()), 1, prim(h_in.clone()),
                    Some(bias2.clone().into_primitive().tensor()), a, norm(), DType::I32, &cfg,
                ).0);
            })?
        } else if kernel == "fc1" {
            timer.time(|i| {
                let _ = dejavu_kernels::cube::rows_gemv_with(
                    prim(ws[i % copies].clone()), Some(idx.clone().into_primitive()), 1, prim(x.clone()),
                    Some(bias1.clone().into_primitive().tensor()), true, DType::I32, &cfg,
                );
            })?
        } else if kernel == "fc2skip" || kernel == "fc2half" {
            let h = if kernel == "fc2skip" { &h_all } else { &h_half };
            timer.time(|i| {
                let _ = dejavu_kernels::cube::rows_transposed_gemv_with(
                    prim(ws[i % copies].clone()), None, 1, prim(h.clone()),
                    Some(bias2.clone().into_primitive().tensor()), None, DType::I32, &cfg,
                );
            })?
        } else {
            timer.time(|i| {
                let _ = dejavu_kernels::cube::rows_transposed_gemv_with(
                    prim(ws[i % copies].clone()), Some(idx.clone().into_primitive()), 1, prim(h.clone()),
                    Some(bias2.clone().into_primitive().tensor()), None, DType::I32, &cfg,
                );
            })?
        };
        let op = match kernel {
            "fc1" => format!("tune_fc1_rows{}", cfg.rows_per_cube),
            "attnout" if cfg.attention_out_rows > 0 && (cfg.attention_round_positions > 0 || cfg.attention_out_threads != 256) => format!(
                "tune_attention_out_proj_rows{}_online{}_units{}",
                cfg.attention_out_rows, cfg.attention_round_positions, cfg.attention_out_threads
            ),
            "attnout" => format!("tune_attention_out_proj_rows{}", cfg.attention_out_rows),
            "attnoutnorm" => format!("tune_attention_out_proj_rows{}_norm{}", cfg.attention_out_rows, if cfg.norm_plain_reads { "_plain" } else { "_atomic" }),
            "fc2skipacc" => format!("tune_fc2t_skip_accumulate_cols{}_lanes{}_compact{}", cfg.cols_per_cube, cfg.lanes_k, cfg.accumulate_compact_rows),
            "fc2halfacc" => format!("tune_fc2t_half_accumulate_cols{}_lanes{}_compact{}", cfg.cols_per_cube, cfg.lanes_k, cfg.accumulate_compact_rows),
            "fc2skipaccnorm" => format!(
                "tune_fc2t_skip_accumulate_cols{}_lanes{}_compact{}_norm{}",
                cfg.cols_per_cube,
                cfg.lanes_k,
                cfg.accumulate_compact_rows,
                if cfg.norm_plain_reads { "_plain" } else { "_atomic" }
            ),
            _ => {
                let what = match kernel {
                    "fc2skip" => "fc2t_skip",
                    "fc2half" => "fc2t_half",
                    "fc2acc" => "fc2t_accumulate",
                    _ => "fc2t",
                };
                // A gathered fc2 always takes the skipping kernel, whose splits `rows_per_lane` sets.
                let gathered = kernel == "fc2" || kernel == "fc2acc";
                let split = if cfg.compact_rows > 0 && !gathered { format!("compact{}", cfg.compact_rows) } else { format!("rpl{}", cfg.rows_per_lane) };
                format!("tune_{what}_cols{}_lanes{}_{split}", cfg.cols_per_cube, cfg.lanes_k)
            }
        };
        // Weight bytes read: the selected rows (half of them for the half-zero input); for
        // the attention, its heads' columns of out_proj.
        let rows_read = if kernel == "fc2half" || kernel == "fc2halfacc" { ffn / 2 } else { k };
        let bytes = if kernel.starts_with("attnout") { (d * slots * hd) as f64 } else { rows_read as f64 * d as f64 } * bytes_per_value(dtype);
        push_timed(out, name, &op, Some(density), Some(k), bytes, t);
    }
    Ok(outcomes)
}

/// The attention block of one decode step over the selected heads: QKV projection of
/// their rows, attention over their KV cache, `out_proj` over their columns.
fn measure_attention<R: CubeRuntime>(
    args: &KernelArgs,
    timer: &Timer<Cube<R>>,
    name: &str,
    config: &OptConfig,
    out: &mut Vec<Timed>,
) -> anyhow::Result<()> {
    use dejavu_kernels::{block_cols_gemv, gather_blocks_gemv, gather_blocks_transposed_gemv, selected_heads_attention};
    type B<R> = Cube<R>;
    let device = &timer.primer.device;
    let dtype = args.dtype.dtype();
    let bpv = bytes_per_value(dtype);
    let (d, n_heads) = (config.hidden_size, config.num_attention_heads);
    let hd = d / n_heads;
    let weight_bytes = (4 * d * d) as f64 * bpv;
    let copies = rotation_copies(args, weight_bytes * 0.5, 16);
    // Wqkv: q, k and v projections stacked ([3d, d], PyTorch layout); Wo transposed
    // ([d_in, d_out]: each head's input dims are rows).
    let w: Vec<AttentionWeights<B<R>>> = (0..copies)
        .map(|_| (random([3 * d, d], dtype, device), random([3 * d], dtype, device), random([d, d], dtype, device), random([d], dtype, device)))
        .collect();
    let x = random::<B<R>, 2>([1, d], dtype, device);
    let mut rng = StdRng::seed_from_u64(5);
    for &len in &args.contexts {
        let kv_bytes = (2 * n_heads * len * hd) as f64 * bpv;
        let kv_copies = rotation_copies(args, kv_bytes * 0.5, 32);
        let caches: Vec<Pair<B<R>, 4>> = (0..kv_copies)
            .map(|_| (random([1, n_heads, len, hd], dtype, device), random([1, n_heads, len, hd], dtype, device)))
            .collect();
        for &p in &args.head_densities {
            let s = ((p * n_heads as f64).round() as usize).clamp(1, n_heads);
            let mut ids: Vec<i32> = (0..n_heads as i32).collect();
            ids.shuffle(&mut rng);
            ids.truncate(s);
            ids.sort_unstable();
            let qkv_ids: Vec<i32> = (0..3).flat_map(|part| ids.iter().map(move |h| part * n_heads as i32 + h)).collect();
            let heads = Tensor::<B<R>, 1, Int>::from_data(TensorData::new(ids.clone(), [s]), device);
            let qkv_heads = Tensor::<B<R>, 1, Int>::from_data(TensorData::new(qkv_ids, [3 * s]), device);
            let q = random::<B<R>, 2>([1, s * hd], dtype, device);
            let attn = random::<B<R>, 2>([1, s * hd], dtype, device);
            let scale = 1.0 / (hd as f32).sqrt();
            let sel_w = (4 * s * hd * d) as f64 * bpv;
            let sel_kv = (2 * s * len * hd) as f64 * bpv;
            let t = timer.time(|i| {
                let (wqkv, bqkv, _, _) = &w[i % copies];
                let _ = gather_blocks_gemv(wqkv.clone(), qkv_heads.clone(), hd, x.clone(), Some(bqkv.clone()), Activation::Identity).unwrap();
            })?;
            push_timed(out, name, &format!("ours_attn_qkv_ctx{len}"), Some(p), Some(s), sel_w * 0.75, t);
            let t = timer.time(|i| {
                let (k, v) = &caches[i % kv_copies];
                let _ = selected_heads_attention(q.clone(), heads.clone(), k.clone(), v.clone(), len, scale).unwrap();
            })?;
            push_timed(out, name, &format!("ours_attn_core_ctx{len}"), Some(p), Some(s), sel_kv, t);
            let t = timer.time(|i| {
                let (_, _, wo_t, bo) = &w[i % copies];
                let _ = gather_blocks_transposed_gemv(wo_t.clone(), heads.clone(), hd, attn.clone(), Some(bo.clone())).unwrap();
            })?;
            push_timed(out, name, &format!("ours_attn_out_ctx{len}"), Some(p), Some(s), sel_w * 0.25, t);
            // What decode runs now: out_proj row-major, the selected heads' columns read in
            // one pass (a square weight, so the transposed copy's values serve for timing).
            let t = timer.time(|i| {
                let (_, _, wo, bo) = &w[i % copies];
                let _ = block_cols_gemv(wo.clone(), Some((heads.clone(), hd)), attn.clone(), Some(bo.clone()), None).unwrap();
            })?;
            push_timed(out, name, &format!("ours_attn_out_cols_ctx{len}"), Some(p), Some(s), sel_w * 0.25, t);
            let t = timer.time(|i| {
                let (wqkv, bqkv, wo_t, bo) = &w[i % copies];
                let (k, v) = &caches[i % kv_copies];
                let qkv = gather_blocks_gemv(wqkv.clone(), qkv_heads.clone(), hd, x.clone(), Some(bqkv.clone()), Activation::Identity).unwrap();
                let q = qkv.slice([0..1, 0..s * hd]);
                let o = selected_heads_attention(q, heads.clone(), k.clone(), v.clone(), len, scale).unwrap();
                let _ = block_cols_gemv(wo_t.clone(), Some((heads.clone(), hd)), o, Some(bo.clone()), None).unwrap();
            })?;
            push_timed(out, name, &format!("ours_attention_ctx{len}"), Some(p), Some(s), sel_w + sel_kv, t);
        }
    }
    Ok(())
}

fn push_timed(out: &mut Vec<Timed>, model: &str, op: &str, density: Option<f64>, k: Option<usize>, bytes: f64, t: (f64, Vec<f64>, f64)) {
    eprintln!("  {op:<34} {:>6} gpu {:>8.2} µs ({:>6.0} GB/s)  stream {:>8.2} µs", density.map(|p| format!("{p}")).unwrap_or_default(), t.0, bytes / t.0 / 1e3, t.2);
    out.push(Timed { model: model.to_string(), op: op.to_string(), density, k, weight_bytes: bytes, gpu_us: t.0, gpu_samples_us: t.1, stream_us: t.2, gpu_gbs: bytes / t.0 / 1e3 });
}

fn run_checks<R: CubeRuntime>(args: &KernelArgs, device: &R::Device) -> anyhow::Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    let seed = fresh_seed();
    for name in &args.models {
        let config = named(name)?;
        let (d, ffn) = (config.hidden_size, config.ffn_dim);
        for batch in [1, 4] {
            let case = Case { rows: ffn, d, k: ffn / 10, batch, dtype: args.dtype.dtype(), seed };
            let t = Instant::now();
            let got = check_gemvs::<Cube<R>, _>(&Poisoned(LaunchConfig::default()), device, &case);
            eprintln!("check {case}: {:.1} s", t.elapsed().as_secs_f64());
            outcomes.extend(got);
        }
        outcomes.extend(check_selection::<Cube<R>>(device, ffn, 1, args.dtype.dtype(), seed));
        outcomes.extend(check_argmax::<Cube<R>>(device, 1, config.vocab_size, args.dtype.dtype(), seed));
        outcomes.extend(check_embed_rows::<Cube<R>>(device, config.vocab_size, d, 3, args.dtype.dtype(), seed));
        let hd = d / config.num_attention_heads;
        // Split over chunks (1000 positions), and one cube per head (200).
        outcomes.extend(check_attention::<Cube<R>>(device, [1, config.num_attention_heads, 1024, hd], 1000, args.dtype.dtype(), seed));
        outcomes.extend(check_attention::<Cube<R>>(device, [1, config.num_attention_heads, 256, hd], 200, args.dtype.dtype(), seed));
        outcomes.extend(check_layer_norm::<Cube<R>>(device, 2, d, args.dtype.dtype(), seed));
        outcomes.extend(check_gated_rows_gemv::<Cube<R>>(device, ffn, d, args.dtype.dtype(), seed));
        outcomes.extend(check_predictor_kernels::<Cube<R>>(device, ffn, d, 128, config.num_attention_heads, args.dtype.dtype(), seed));
        outcomes.extend(check_predicted_mlp::<Cube<R>>(device, ffn, d, 128, args.dtype.dtype(), seed));
        outcomes.extend(check_norm_predict::<Cube<R>>(device, d, 128, config.num_attention_heads, args.dtype.dtype(), seed));
        outcomes.extend(check_norms_ahead::<Cube<R>>(device, config.num_attention_heads, hd, ffn, 128, 256, 200, args.dtype.dtype(), seed));
        outcomes.extend(check_kv_append::<Cube<R>>(device, [1, config.num_attention_heads, 64, hd], d, 17, args.dtype.dtype(), seed));
        outcomes.extend(check_qkv_lazy::<Cube<R>>(device, config.num_attention_heads, hd, d, 16, 40, false, args.dtype.dtype(), seed));
        outcomes.extend(check_qkv_lazy::<Cube<R>>(device, config.num_attention_heads, hd, d, 4, 40, true, args.dtype.dtype(), seed));
        outcomes.extend(check_block_cols_gemv::<Cube<R>>(device, d, config.num_attention_heads, hd, 1, args.dtype.dtype(), seed));
        // Attention with out_proj into an f32 residual: one launch (200 positions) with
        // the online softmax and with the two-phase one, and the two kernels past 256.
        for (attention_out_rows, attention_round_positions) in [(0, 8), (256, 8), (256, 0)] {
            let launcher = Poisoned(LaunchConfig { attention_out_rows, attention_round_positions, ..LaunchConfig::default() });
            outcomes.extend(check_attention_out_proj::<Cube<R>, _>(&launcher, device, [1, config.num_attention_heads, 256, hd], 200, d, args.dtype.dtype(), seed));
            outcomes.extend(check_attention_out_proj::<Cube<R>, _>(&launcher, device, [1, config.num_attention_heads, 512, hd], 300, d, args.dtype.dtype(), seed));
        }
    }
    print_outcomes(&outcomes);
    Ok(outcomes)
}

fn print_outcomes(outcomes: &[Outcome]) {
    for o in outcomes {
        println!("check {:<34} {:<60} worst/tol {:.3} {}", o.op, o.case, o.worst_ratio, if o.passed { "ok" } else { "FAILED" });
    }
}

fn named(name: &str) -> anyhow::Result<OptConfig> {
    OptConfig::named(name).with_context(|| format!("unknown model shape {name:?}: use a published OPT size such as opt-6.7b"))
}

fn run_on<R: CubeRuntime>(args: KernelArgs, device: R::Device, peer: Option<Value>) -> anyhow::Result<()> {
    let mut checks = if args.check { Some(run_checks::<R>(&args, &device)?) } else { None };
    let primer_values = args.primer_mb * (1 << 20) / 4;
    let primer = Tensor::<Cube<R>, 1>::random([primer_values], Distribution::Default, &device);
    let timer = Timer { primer: Primer::new(primer), calls: args.calls, samples: args.samples };
    let copy_gbs = {
        let mut times = Vec::new();
        for _ in 0..6 {
            times.push(timer.primer.seconds(4)?);
        }
        4.0 * 2.0 * (primer_values * 4) as f64 / median(&mut times) / 1e9
    };
    eprintln!("copy bandwidth (read + write of {} MiB, f32 scale) {copy_gbs:.0} GB/s", args.primer_mb);
    let mut rows = Vec::new();
    if args.tune {
        let tuned = tune::<R>(&args, &timer, &mut rows)?;
        for o in &tuned {
            println!("check {:<34} {:<60} worst/tol {:.3} {}", o.op, o.case, o.worst_ratio, if o.passed { "ok" } else { "FAILED" });
        }
        if let Some(c) = checks.as_mut() {
            c.extend(tuned);
        }
    }
    for name in &args.models {
        let config = named(name)?;
        measure_model::<R>(&args, &timer, name, &config, &mut rows)?;
        if !args.contexts.is_empty() {
            measure_attention::<R>(&args, &timer, name, &config, &mut rows)?;
        }
        write_report(&args, &rows, checks.as_deref(), peer.as_ref(), copy_gbs, false)?;
    }
    write_report(&args, &rows, checks.as_deref(), peer.as_ref(), copy_gbs, true)?;
    if let Some(c) = &checks {
        let failed = c.iter().filter(|o| !o.passed).count();
        if failed > 0 {
            bail!("{failed} kernel checks failed (see above)");
        }
    }
    Ok(())
}

fn run_peer(args: &KernelArgs) -> anyhow::Result<Option<Value>> {
    if let Some(path) = &args.peer_json {
        return Ok(Some(read_json(path)?));
    }
    if args.peer_python.is_empty() {
        return Ok(None);
    }
    let join = |v: Vec<String>| v.join(",");
    let peer_args: Vec<String> = vec![
        "--models".into(),
        args.models.join(","),
        "--densities".into(),
        join(args.densities.iter().map(|x| x.to_string()).collect()),
        "--ranks".into(),
        join(args.ranks.iter().map(|r| r.to_string()).collect()),
        "--calls".into(),
        args.calls.to_string(),
        "--samples".into(),
        args.samples.to_string(),
        "--rotate-mb".into(),
        args.rotate_mb.to_string(),
        "--contexts".into(),
        join(args.contexts.iter().map(|c| c.to_string()).collect()),
        "--dtype".into(),
        if args.dtype == StorageKind::F16 { "float16" } else { "float32" }.into(),
    ];
    run_peer_script(&args.peer_python, Path::new("bench/peers/torch_kernels.py"), &peer_args, "PyTorch")
}

pub fn run(args: KernelArgs) -> anyhow::Result<()> {
    let peer = run_peer(&args)?;
    match args.backend {
        #[cfg(feature = "cuda")]
        CubeKind::Cuda => run_on::<cubecl::cuda::CudaRuntime>(args, Default::default(), peer),
        #[cfg(feature = "wgpu")]
        CubeKind::Wgpu => run_on::<cubecl::wgpu::WgpuRuntime>(args, Default::default(), peer),
        #[allow(unreachable_patterns)]
        other => bail!("this dejavu-bench was built without the {other:?} backend"),
    }
}

/// The PyTorch peer's median GPU µs for (model, op, density).
fn peer_us(peer: Option<&Value>, model: &str, op: &str, density: Option<f64>) -> Option<f64> {
    peer?["rows"].as_array()?.iter().find_map(|r| {
        let same_density = match (density, r["density"].as_f64()) {
            (None, None) => true,
            (Some(a), Some(b)) => (a - b).abs() < 1e-9,
            _ => false,
        };
        (r["model"] == model && r["op"] == op && same_density).then(|| r["gpu_us"].as_f64()).flatten()
    })
}

fn write_report(
    args: &KernelArgs,
    rows: &[Timed],
    checks: Option<&[Outcome]>,
    peer: Option<&Value>,
    copy_gbs: f64,
    print: bool,
) -> anyhow::Result<()> {
    let find = |model: &str, op: &str, density: Option<f64>| {
        rows.iter()
            .find(|r| r.model == model && r.op == op && r.density.map(|a| density.map(|b| (a - b).abs() < 1e-9).unwrap_or(false)).unwrap_or(density.is_none()))
            .map(|r| r.gpu_us)
    };
    let mut summary = Vec::new();
    for model in &args.models {
        let dense_mlp_torch = peer_us(peer, model, "torch_dense_mlp", None);
        let ours_dense_fc1 = find(model, "ours_dense_fc1", None);
        let torch_dense_fc1 = peer_us(peer, model, "torch_dense_fc1", None);
        for &p in &args.densities {
            let ours_mlp = find(model, "ours_sparse_mlp", Some(p));
            let ours_mlp_acc = find(model, "ours_sparse_mlp_accumulate", Some(p));
            let ours_fc1 = find(model, "ours_fc1_gather", Some(p));
            let slice_fc1 = peer_us(peer, model, "torch_slice_fc1", Some(p));
            let slice_mlp = peer_us(peer, model, "torch_slice_mlp", Some(p));
            let index_mlp = peer_us(peer, model, "torch_index_select_mlp", Some(p));
            let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
            summary.push(serde_json::json!({
                "model": model,
                "density": p,
                "ours_sparse_mlp_us": ours_mlp,
                "torch_dense_mlp_us": dense_mlp_torch,
                "speedup_vs_torch_dense_mlp": ratio(dense_mlp_torch, ours_mlp),
                "ours_sparse_mlp_accumulate_us": ours_mlp_acc,
                "accumulate_speedup_vs_torch_dense_mlp": ratio(dense_mlp_torch, ours_mlp_acc),
                "torch_index_select_mlp_us": index_mlp,
                "speedup_vs_torch_index_select_mlp": ratio(index_mlp, ours_mlp),
                "torch_slice_mlp_us": slice_mlp,
                "ours_fc1_gather_us": ours_fc1,
                "torch_slice_fc1_us": slice_fc1,
                "fc1_fraction_of_slice_bandwidth": ratio(slice_fc1, ours_fc1),
                "ours_dense_fc1_us": ours_dense_fc1,
                "torch_dense_fc1_us": torch_dense_fc1,
                "dense_gemv_fraction_of_cublas": ratio(torch_dense_fc1, ours_dense_fc1),
            }));
        }
    }
    let commit = commit();
    let device = device_name(&format!("{:?}", args.backend));
    let fields = serde_json::json!({
        "backend": args.backend,
        "dtype": args.dtype,
        "batch": 1,
        "calls_per_sample": args.calls,
        "samples": args.samples,
        "rotate_mb": args.rotate_mb,
        "copy_bandwidth_gbs": copy_gbs,
        "note": "gpu_us: median over samples of (time(primer + calls) - time(primer)) / calls, the primer \
                 being passes over a --primer-mb tensor long enough for the host to enqueue every call first, so \
                 calls run back to back without launch gaps; stream_us: wall time per call of the same \
                 loop without a primer. Weights rotate over copies so L2 cannot serve repeats. Shapes: \
                 fc1 [ffn, d], fc2 transposed [ffn, d], x [1, d]; f32 accumulation. fc1 biases are positive, so \
                 every selected neuron is active and the sparse MLP reads all K rows of fc2.",
        "checks": checks,
        "peer": peer,
        "summary": summary,
        "rows": rows,
    });
    let out = write_benchmark("kernels", &device, &commit, fields, args.out.as_deref(), "kernels")?;
    if !print {
        return Ok(());
    }
    println!("sparse MLP kernels, batch 1, {:?}, {device}; copy bandwidth {copy_gbs:.0} GB/s; GPU µs per call (launch gaps excluded)", args.dtype);
    println!("| model | density | ours sparse MLP | torch dense MLP | speedup | ours sparse MLP into f32 (atomics) | speedup | torch index_select MLP | ours fc1 gather | torch slice fc1 | of slice BW | ours dense fc1 | cuBLAS fc1 | of cuBLAS |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let f = |v: &Value, p: usize| v.as_f64().map(|v| format!("{v:.p$}")).unwrap_or_else(|| "—".into());
    for s in &summary {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s["model"].as_str().unwrap_or(""), s["density"], f(&s["ours_sparse_mlp_us"], 1), f(&s["torch_dense_mlp_us"], 1),
            f(&s["speedup_vs_torch_dense_mlp"], 2), f(&s["ours_sparse_mlp_accumulate_us"], 1),
            f(&s["accumulate_speedup_vs_torch_dense_mlp"], 2), f(&s["torch_index_select_mlp_us"], 1), f(&s["ours_fc1_gather_us"], 1),
            f(&s["torch_slice_fc1_us"], 1), f(&s["fc1_fraction_of_slice_bandwidth"], 2), f(&s["ours_dense_fc1_us"], 1),
            f(&s["torch_dense_fc1_us"], 1), f(&s["dense_gemv_fraction_of_cublas"], 2)
        );
    }
    println!("| model | op | density | ours gpu µs | ours stream µs | torch gpu µs (attention: dense, all heads) |");
    println!("|---|---|---|---|---|---|");
    for r in rows.iter().filter(|r| {
        r.op.starts_with("ours_predictor")
            || r.op.starts_with("ours_fused_predictor")
            || r.op.starts_with("ours_norm_predict")
            || r.op.starts_with("ours_predicted_")
            || r.op.starts_with("ours_fc1_gather_predicted")
            || r.op == "ours_layer_norm"
            || r.op == "ours_select"
            || r.op.starts_with("tune_")
            || r.op.starts_with("ours_attention")
    }) {
        let torch = if r.op.starts_with("ours_attention") {
            // The peer's attention is dense (every head): the baseline to beat.
            peer_us(peer, &r.model, &r.op.replace("ours_attention", "torch_attention_dense"), None)
        } else {
            peer_us(peer, &r.model, &r.op.replace("ours_", "torch_"), r.density)
        };
        let torch = torch.map(|v| format!("{v:.1}")).unwrap_or_else(|| "—".into());
        let density = r.density.map(|p| format!("{p:.3}")).unwrap_or_default();
        println!("| {} | {} | {} | {:.1} | {:.1} | {} |", r.model, r.op, density, r.gpu_us, r.stream_us, torch);
    }
    // The decode step's whole MLP, predictor included, against the dense fp16 MLP.
    for r in rows.iter().filter(|r| r.op.starts_with("ours_predicted_mlp")) {
        if let Some(dense) = peer_us(peer, &r.model, "torch_dense_mlp", None) {
            println!("{} {}: {:.1} µs, {:.2}x faster than the dense MLP through cuBLAS ({dense:.1} µs)", r.model, r.op, r.gpu_us, dense / r.gpu_us);
        }
    }
    println!("wrote {}", out.display());
    Ok(())
}
