//! `dejavu-bench e2e`: batch-1 decode latency per token, end to end — our dense model,
//! our sparse model at the paper's latency setting and at opt-mini's measured operating
//! point, and Hugging Face `transformers` — against the bytes each must read.
//!
//! Published shapes get random weights and random predictors of the real shapes, made in
//! process: latency does not depend on weight values. Their selection is a logit threshold
//! per layer, set from one decode step's real predictor logits so that the layer keeps the
//! target fraction; each token then keeps about that fraction (the JSON reports what was
//! kept, measured over the timed tokens).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use burn::prelude::*;
use burn::tensor::DType;
use dejavu_runtime::{dispatch, BackendKind, BackendTask, Precision, SparseKernels};
use dejavu_model::generate::{greedy_tokens, token_tensor};
use dejavu_model::{
    content_hash, generate, load_model, use_row_major_weights, Activation, DecodeWeights, Dense, ForwardHooks, GenerateOptions,
    KernelDecode, KvCache, LayerKvCache, NormSite, Opt, OptConfig, Sampling, SparseModel, SparseOptions, SparsityStats, Step, Tapped,
};
use dejavu_predictor::{
    DenseLayers, LayerEntry, Manifest, OperatingPoint, OutputEntry, PredictorModules, PredictorSet, Selection, SparsityPlan,
};
use serde::Serialize;
use serde_json::{json, Value};

use crate::dense::{bytes_per_value, copy_bandwidth};
use crate::primer::Primer;
use crate::report::{commit, device_name, median, read_json, run_peer_script, write_benchmark};

#[derive(clap::Args, Debug, Clone)]
pub struct E2eArgs {
    /// Models: published OPT shapes with random weights (opt-1.3b, opt-6.7b, opt-13b,
    /// opt-30b) and `opt-mini`, the bundled trained model with its trained predictors
    #[arg(long, value_delimiter = ',', default_value = "opt-mini,opt-1.3b,opt-6.7b,opt-13b")]
    models: Vec<String>,
    #[arg(long, value_enum, default_value = "cuda")]
    backend: BackendKind,
    #[arg(long, value_enum, default_value = "f16")]
    dtype: Precision,
    /// Prompt lengths (prefilled densely, not timed)
    #[arg(long, value_delimiter = ',', default_value = "128,256,512,1024")]
    prompt_lens: Vec<usize>,
    /// New tokens per run; per-token latency = time of the last N − 1 steps / (N − 1)
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Timed runs per row (after one untimed warm-up run)
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// How the timed runs hand each step's token to the next step (the warm-up run always
    /// reads every token, and the timed runs' tokens are checked against its)
    #[arg(long, value_enum, default_value = "step")]
    readback: Readback,
    /// Sparse rows: keys and values written only for the heads each step reads, a head's
    /// missed tokens recomputed from the inputs of the last N steps (the reference: 16;
    /// 0: every head's written at every step, the sparse path's default)
    #[arg(long, default_value_t = 0, value_name = "N")]
    lazy_kv_window: usize,
    /// Sparse rows: the decode step's fused predictor kernels read the predictors in the
    /// model's dtype (f16: half the predictor bytes) instead of f32
    #[arg(long)]
    predictors_in_model_dtype: bool,
    /// Decode steps take their buffers from the allocator's default pool, without the pool
    /// of fixed sizes the decode hooks turn on for a run's first step (the allocator is the
    /// process's: compare the two in separate processes)
    #[arg(long)]
    no_step_buffer_pool: bool,
    /// Sparse rows: the decode step's MLP as the fused `predicted_mlp` kernel (predictor,
    /// selection, fc1 and fc2's split sums in one launch, then the residual add) instead of
    /// the separate kernels (gated fc1, then fc2's two passes)
    #[arg(long)]
    fused_mlp: bool,
    /// Sparse rows: the decode step's residual stream in f32, out_proj and fc2 adding into
    /// it (fc2 in one launch, with f32 atomics; not with --fused-mlp)
    #[arg(long, conflicts_with = "fused_mlp")]
    f32_residual: bool,
    /// Sparse rows, with --f32-residual: attention and out_proj in one launch
    #[arg(long, requires = "f32_residual")]
    fused_attention: bool,
    /// Sparse rows, with --f32-residual: the LayerNorms written by the launch that
    /// finishes the residual (its last cube), the next layer's predictors riding in the
    /// next launches: no LayerNorm launches in sparse layers
    #[arg(long, requires = "f32_residual")]
    fused_norms: bool,
    /// With --fused-norms: no launch writes a sparse layer's attention LayerNorm; its
    /// qkv_append applies it to the f32 residual itself (fc2 before it then ends with its adds)
    #[arg(long, requires = "fused_norms")]
    deferred_norms: bool,
    /// The paper's latency setting for the synthetic models: MLP density in sparse layers
    #[arg(long, default_value_t = 0.1)]
    mlp_density: f64,
    /// … and attention (head) density in sparse layers
    #[arg(long, default_value_t = 0.5)]
    attention_density: f64,
    /// Fraction of the last layers whose MLP stays dense (the reference keeps the last 10
    /// of OPT-175B's 96); layer 0 has no predictor (lookahead 1) and the last layer's
    /// attention stays dense, as in the reference
    #[arg(long, default_value_t = 0.1)]
    dense_last_mlp_fraction: f64,
    /// Rank of the synthetic predictors
    #[arg(long, default_value_t = 128)]
    rank: usize,
    /// Seed of the published shapes' random weights and predictors: with the same seed
    /// every process (and every binary) builds the same model and keeps the same neurons
    /// and heads, so two processes' rows differ only by their code and the machine
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Operating points of opt-mini's trained predictors to time (threshold selection is a
    /// single kernel; top-K ones go through the multisection kernels)
    #[arg(long, value_delimiter = ';', default_value = "threshold;calibrated")]
    opt_mini_points: Vec<OperatingPoint>,
    #[arg(long, default_value = "assets/opt-mini")]
    opt_mini: PathBuf,
    #[arg(long, default_value = "assets/opt-mini-predictors")]
    opt_mini_predictors: PathBuf,
    /// The one-layer breakdown (predictor, selection, attention, MLP, rest) at this shape
    /// (empty: none)
    #[arg(long, default_value = "opt-6.7b")]
    breakdown: String,
    /// Profile each row after its timed runs: µs per decode step inside each hook (the
    /// predictors, attention, MLP, norms), host-only and with the device synced around
    /// each hook (two extra runs of 33 tokens), and the GPU time of one step with no launch
    /// gaps (the step enqueued behind a long primer)
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    profile: bool,
    /// Sample where the host's time goes during `--host-profile-runs` more runs of each
    /// row at the first prompt length, appending per-function summaries to this file and
    /// the sampled stacks, folded, to FILE.folded (needs the `host-profile` feature)
    #[arg(long, value_name = "FILE")]
    host_profile: Option<PathBuf>,
    /// Decode runs sampled per row by `--host-profile` (the sampler fires far below its
    /// asked rate: on the H100 machine a 6.7B run of 128 tokens gave 77 samples sparse and
    /// 125 dense, run 90)
    #[arg(long, default_value_t = 3)]
    host_profile_runs: usize,
    /// Read the transformers peer's results from this JSON instead of running it
    #[arg(long, value_name = "FILE")]
    peer_json: Option<PathBuf>,
    /// Python that runs bench/peers/hf_decode.py; empty to skip the peer
    #[arg(long, default_value = "python3")]
    peer_python: String,
    /// Where to write the JSON [default: bench/results/e2e-<commit>.json]
    #[arg(long)]
    out: Option<PathBuf>,
}

/// How a timed decode run gets each greedy token to the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Readback {
    /// The host reads each token before it enqueues the next step, as streaming
    /// generation does: the GPU idles while the host enqueues the first launches of a step.
    Step,
    /// The token stays on the device (the next step embeds the argmax tensor itself) and
    /// the host reads all tokens once, at the end of the run, inside the timing: the host
    /// enqueues step t + 1 while the GPU runs step t.
    End,
}

#[derive(Debug, Serialize, Clone)]
struct Row {
    model: String,
    weights: &'static str,
    config: String,
    prompt_len: usize,
    ms_per_token: f64,
    runs_ms: Vec<f64>,
    /// Per timed run: when it started and how often the process's threads were switched
    /// out during it ([`RunContext`]), to tell a slow run's cause.
    runs_context: Vec<RunContext>,
    /// Mean fraction kept over all layers, dense layers counting 1 (sparse rows).
    kept_mlp: Option<f64>,
    kept_attention: Option<f64>,
    bytes_per_token: f64,
    floor_ms: f64,
    over_floor: f64,
    /// µs per decode step by hook (see `ProfiledHooks`), when profiled.
    profile: Option<Value>,
    /// Trained models only: the first step at which a timed run's greedy token differed
    /// from the warm-up run's (none: every run repeated its tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_first_difference: Option<usize>,
}

/// Bytes a decode step must read with the given per-layer kept fractions (`None`: dense).
/// Per layer: q and `out_proj` rows of the kept heads, the k and v rows of every head
/// (written each step) or, with `lazy_kv`, of the kept heads (a head's missed tokens are
/// recomputed from inputs already read), fc1 and fc2 rows of the kept neurons, the kept
/// heads' KV over the mean context, and the predictors (f32); plus the LM head (the whole
/// embedding table).
fn bytes_per_token(config: &OptConfig, stats: Option<&SparsityStats>, predictor_bytes: f64, mean_context: f64, bpv: f64, lazy_kv: bool) -> f64 {
    let d = config.hidden_size as f64;
    let ffn = config.ffn_dim as f64;
    let mut total = config.vocab_size as f64 * d * bpv;
    for l in 0..config.num_hidden_layers {
        let (m, a) = match stats {
            Some(s) => (s.mlp[l].unwrap_or(1.0), s.attention[l].unwrap_or(1.0)),
            None => (1.0, 1.0),
        };
        let kv = if lazy_kv { a } else { 1.0 };
        total += (2.0 * a * d * d + 2.0 * kv * d * d + 2.0 * m * d * ffn) * bpv;
        total += 2.0 * a * mean_context * d * bpv;
    }
    total + predictor_bytes
}

/// Bytes the predictors read per token (every layer's two factors, in f32 or, with
/// `--predictors-in-model-dtype`, `bpv` bytes a value).
fn predictor_bytes<B: Backend>(modules: &PredictorModules<B>, args: &E2eArgs, bpv: f64) -> f64 {
    let per_value = if args.predictors_in_model_dtype { bpv } else { 4.0 };
    let mut bytes = 0.0;
    for p in modules.mlp.iter().chain(&modules.attention).flatten() {
        let (d, r, o) = p.dims();
        bytes += (d * r + r * o) as f64 * per_value;
    }
    bytes
}

/// The sparse path's options for the rows of this run.
fn sparse_options(args: &E2eArgs) -> SparseOptions {
    SparseOptions {
        lazy_kv_window: args.lazy_kv_window,
        predictors_in_model_dtype: args.predictors_in_model_dtype,
        fused_mlp: args.fused_mlp,
        f32_residual: args.f32_residual,
        fused_attention: args.fused_attention,
        fused_norms: args.fused_norms,
        deferred_norms: args.deferred_norms,
        ..Default::default()
    }
}

/// Host cost of one launch: the time per launch of 2,000 back-to-back launches of a kernel
/// that does almost nothing (LayerNorm of 64 values), synced once at the end.
fn launch_overhead_us<B: SparseKernels>(device: &B::Device) -> anyhow::Result<f64> {
    let x = Tensor::<B, 2>::ones([1, 64], device);
    let g = Tensor::<B, 1>::ones([64], (device, DType::F32));
    let b = Tensor::<B, 1>::zeros([64], (device, DType::F32));
    let mut per = Vec::new();
    for round in 0..4 {
        B::sync(device).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let t = Instant::now();
        for _ in 0..2000 {
            let _ = dejavu_kernels::layer_norm(x.clone(), g.clone(), b.clone(), 1e-5)?;
        }
        B::sync(device).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        if round > 0 {
            per.push(t.elapsed().as_secs_f64() * 1e6 / 2000.0);
        }
    }
    Ok(median(&mut per))
}

/// The logit above which a fraction `density` of `logits` lies.
fn quantile_threshold<B: Backend>(logits: Tensor<B, 2>, density: f64) -> f32 {
    let mut v: Vec<f32> = logits.cast(DType::F32).into_data().convert::<f32>().into_vec().expect("f32 logits");
    v.sort_by(|a, b| b.total_cmp(a));
    let k = ((density * v.len() as f64).round() as usize).clamp(1, v.len());
    // Halfway between the k-th and the (k+1)-th largest.
    if k < v.len() {
        (v[k - 1] + v[k]) / 2.0
    } else {
        v[k - 1] - 1.0
    }
}

/// Random predictors of rank `rank` for every layer from 1 on (lookahead 1), a plan at the
/// paper's latency setting with thresholds set from one decode step's logits, and the
/// predictors' bytes per token.
fn synthetic_sparse<B: SparseKernels>(
    model: &Opt<B>,
    config: &OptConfig,
    weights: &DecodeWeights<B>,
    cache: &mut KvCache<B>,
    prompt: &[u32],
    args: &E2eArgs,
) -> anyhow::Result<(SparseModel<B>, f64)> {
    let layers = config.num_hidden_layers;
    let entry = |rank: usize| OutputEntry::unmeasured(rank, None, Some(0.0));
    let dense_mlp_from = layers - ((args.dense_last_mlp_fraction * layers as f64).round() as usize).min(layers - 1);
    let manifest = Manifest {
        format: 1,
        model_hash: "synthetic".into(),
        hidden_size: config.hidden_size,
        ffn_dim: config.ffn_dim,
        num_heads: config.num_attention_heads,
        num_layers: layers,
        lookahead: 1,
        layers: (0..layers)
            .map(|layer| LayerEntry {
                layer,
                mlp: (layer >= 1 && layer < dense_mlp_from).then(|| entry(args.rank)),
                attention: (layer >= 1 && layer + 1 < layers).then(|| entry(args.rank)),
            })
            .collect(),
    };
    let device = model.device();
    let set = PredictorSet::<B>::init(manifest.clone(), &device)?;
    let modules = set.modules.into_f32();
    let predictor_bytes = predictor_bytes(&modules, args, bytes_per_value(args.dtype));

    // One decode step after the prompt, recording every layer's inputs.
    let (mut attention_inputs, mut mlp_inputs) = (vec![None; layers], vec![None; layers]);
    let mut record = Tapped {
        inner: KernelDecode::new(weights),
        tap: |activation: &Activation<'_, B>| match activation {
            Activation::AttentionInput { layer, value } if value.dims()[1] == 1 => attention_inputs[*layer] = Some((*value).clone()),
            Activation::MlpInput { layer, value } if value.dims()[1] == 1 => mlp_inputs[*layer] = Some((*value).clone()),
            _ => {}
        },
    };
    decode_run(model, cache, &mut record, prompt, 2, Readback::Step)?;
    drop(record);

    let mut plan = SparsityPlan::new(&manifest, &OperatingPoint::Threshold, &DenseLayers::default())?;
    let logits = |p: &dejavu_predictor::LowRankClassifier<B>, x: &Option<Tensor<B, 3>>| -> anyhow::Result<Tensor<B, 2>> {
        let x = x.clone().context("the recording step saw every layer")?;
        let [_, _, d] = x.dims();
        Ok(p.forward(x.reshape([1, d]).cast(DType::F32)))
    };
    for target in 1..layers {
        if let Some(p) = &modules.mlp[target] {
            let t = quantile_threshold(logits(p, &mlp_inputs[target - 1])?, args.mlp_density);
            plan.layers[target].mlp = Selection::Threshold { threshold: t };
        }
        if let Some(p) = &modules.attention[target] {
            let t = quantile_threshold(logits(p, &attention_inputs[target - 1])?, args.attention_density);
            plan.layers[target].attention = Selection::Threshold { threshold: t };
        }
    }
    let sparse = SparseModel::with_weights(model, "synthetic", plan, modules, sparse_options(args), weights.clone())?;
    Ok((sparse, predictor_bytes))
}

struct Timing {
    runs_ms: Vec<f64>,
    runs_context: Vec<RunContext>,
    stats: Option<SparsityStats>,
    profile: Option<Value>,
    tokens_first_difference: Option<usize>,
}

/// What else happened during a timed run: its start (Unix ms, to line it up with a log of
/// the GPU's clocks taken beside it) and the context switches of every thread of this
/// process over the run (Linux `/proc/self/task/*/status`; zero elsewhere). Both the
/// model's thread and CubeCL's device thread spin while they wait, so a run whose threads
/// were switched out involuntarily far more than others' shared its CPUs with other work.
#[derive(Debug, Serialize, Clone, Copy)]
struct RunContext {
    start_unix_ms: u128,
    voluntary_switches: u64,
    involuntary_switches: u64,
}

impl RunContext {
    fn now() -> Self {
        let start_unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let (voluntary_switches, involuntary_switches) = context_switches();
        Self { start_unix_ms, voluntary_switches, involuntary_switches }
    }

    /// The switches since `self` was taken.
    fn until_now(self) -> Self {
        let (voluntary, involuntary) = context_switches();
        Self {
            start_unix_ms: self.start_unix_ms,
            voluntary_switches: voluntary.saturating_sub(self.voluntary_switches),
            involuntary_switches: involuntary.saturating_sub(self.involuntary_switches),
        }
    }
}

/// Voluntary and involuntary context switches summed over this process's threads.
fn context_switches() -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return (0, 0) };
    let field = |status: &str, key: &str| status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .fold((0, 0), |(v, i), s| (v + field(&s, "voluntary_ctxt_switches:"), i + field(&s, "nonvoluntary_ctxt_switches:")))
}

/// Prompt positions per prefill call: every prompt length then runs the same shapes, so
/// the GPU kernels are compiled and autotuned once, not once per length.
const PREFILL_CHUNK: usize = 128;

/// Empties `cache` and runs `prompt` through it in chunks of [`PREFILL_CHUNK`]; returns
/// the last chunk's hidden states.
fn prefill<B: SparseKernels>(model: &Opt<B>, cache: &mut KvCache<B>, hooks: &mut dyn ForwardHooks<B>, prompt: &[u32]) -> anyhow::Result<Tensor<B, 3>> {
    let device = model.device();
    cache.reset();
    let mut hidden = None;
    for (i, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
        tracing::debug!("prefill chunk {i} ({} tokens)", chunk.len());
        hidden = Some(model.forward_with(token_tensor::<B>(chunk, &device), cache, hooks)?);
    }
    hidden.context("an empty prompt")
}

/// One greedy run with the library's loop spelled out (as `generate` does it, token read
/// back each step) over a cache made once for every prompt length: prefill in chunks, then
/// `new_tokens` steps; returns ms per decode step over the last `new_tokens − 1`.
fn decode_run<B: SparseKernels>(
    model: &Opt<B>,
    cache: &mut KvCache<B>,
    hooks: &mut dyn ForwardHooks<B>,
    prompt: &[u32],
    new_tokens: usize,
    readback: Readback,
) -> anyhow::Result<(f64, Vec<u32>)> {
    let device = model.device();
    let hidden = prefill(model, cache, hooks, prompt)?;
    let [_, n, width] = hidden.dims();
    let argmax = |h: Tensor<B, 3>| greedy_token(model, h);
    let first = argmax(hidden.slice([0..1, n - 1..n, 0..width]))?;
    let mut tokens = vec![first.clone().into_scalar().elem::<i64>() as u32];
    let started = Instant::now();
    match readback {
        Readback::Step => {
            for _ in 1..new_tokens {
                let h = model.forward_with(token_tensor::<B>(&tokens[tokens.len() - 1..], &device), cache, hooks)?;
                tokens.push(argmax(h)?.into_scalar().elem::<i64>() as u32);
            }
        }
        Readback::End => {
            let mut on_device = vec![first];
            for _ in 1..new_tokens {
                let h = model.forward_with(on_device[on_device.len() - 1].clone(), cache, hooks)?;
                on_device.push(argmax(h)?);
            }
            let read: Vec<i64> = Tensor::cat(on_device.split_off(1), 1).into_data().convert::<i64>().into_vec::<i64>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
            tokens.extend(read.into_iter().map(|t| t as u32));
        }
    }
    Ok((started.elapsed().as_secs_f64() * 1e3 / (new_tokens - 1).max(1) as f64, tokens))
}

/// The greedy next token `[1, 1]` on the device for one position's hidden state `[1, 1,
/// d]`, as `generate` takes it ([`greedy_tokens`]: the argmax of the LM head's output in
/// the weights' dtype, two launches after the matmul on CubeBackend).
fn greedy_token<B: SparseKernels>(model: &Opt<B>, h: Tensor<B, 3>) -> anyhow::Result<Tensor<B, 2, Int>> {
    Ok(greedy_tokens(model, h)?.reshape([1, 1]))
}

/// A sparse row's hooks for [`time_decode`]: counting what steps keep or not, with the
/// step buffer pool or without (`--no-step-buffer-pool`).
fn sparse_hooks<B: SparseKernels>(sparse: &SparseModel<B>, count: bool, pool: bool) -> Box<dyn ForwardHooksWithStats<B> + '_> {
    let hooks = if count { sparse.hooks() } else { sparse.hooks().without_counts() };
    Box::new(if pool { hooks } else { hooks.without_step_buffer_pool() })
}

/// The dense row's hooks, with the step buffer pool or without.
fn dense_hooks<B: SparseKernels>(weights: &DecodeWeights<B>, pool: bool) -> Box<dyn ForwardHooksWithStats<B> + '_> {
    let hooks = KernelDecode::new(weights);
    Box::new(if pool { hooks } else { hooks.without_step_buffer_pool() })
}

/// Warm-up run, then `runs` timed runs: ms per decode step.
fn time_decode<'h, B: SparseKernels>(
    model: &Opt<B>,
    cache: &mut KvCache<B>,
    hooks: &mut dyn FnMut(bool) -> Box<dyn ForwardHooksWithStats<B> + 'h>,
    prompt: &[u32],
    args: &E2eArgs,
    label: &str,
    trained: bool,
) -> anyhow::Result<Timing> {
    // The warm-up run counts what each step keeps; the timed runs (the same greedy tokens,
    // so the same selections) do not pay for counting.
    let warm = Instant::now();
    let mut h = hooks(true);
    decode_run(model, cache, h.as_hooks(), prompt, args.new_tokens, Readback::Step)?;
    let stats = h.stats();
    // A second warm-up run gives the tokens the timed runs must repeat: the first call of
    // a shape may run while its kernels are still being autotuned, and on opt-mini (a
    // trained model whose top logits can lie within f16 rounding of each other) that
    // changed a greedy token.
    let (_, warm_tokens) = decode_run(model, cache, hooks(false).as_hooks(), prompt, args.new_tokens, Readback::Step)?;
    eprintln!("  warm-up runs {:.1} s", warm.elapsed().as_secs_f64());
    let mut runs_ms = Vec::new();
    let mut runs_context = Vec::new();
    let mut tokens_first_difference = None;
    for _ in 0..args.runs {
        let mut h = hooks(false);
        let before = RunContext::now();
        let (ms, tokens) = decode_run(model, cache, h.as_hooks(), prompt, args.new_tokens, args.readback)?;
        runs_context.push(before.until_now());
        // The same greedy tokens, or the timed runs did other work than the warm-up's.
        if tokens != warm_tokens {
            let at = tokens.iter().zip(&warm_tokens).position(|(a, b)| a != b).unwrap_or(tokens.len().min(warm_tokens.len()));
            // Random weights keep their top logits far apart, so there a difference is a
            // fault. A trained model's top two can lie within f16 rounding (seen on
            // opt-mini, cause not found: run-to-run differences of the autotuned prefill
            // kernels, we think), so its difference is recorded, and its time still is
            // that of one greedy run.
            if !trained {
                bail!("a timed run ({:?} readback) chose other tokens than the warm-up run from step {at}", args.readback);
            }
            eprintln!("  a timed run chose other tokens than the warm-up run from step {at} (recorded)");
            tokens_first_difference = Some(tokens_first_difference.map_or(at, |d: usize| d.min(at)));
        }
        runs_ms.push(ms);
    }
    if let Some(out) = args.host_profile.as_ref().filter(|_| args.prompt_lens.first() == Some(&prompt.len())) {
        let runs = args.host_profile_runs;
        let label = format!("{label}, prompt {}, {:?} readback, {runs} runs of {} tokens", prompt.len(), args.readback, args.new_tokens);
        crate::hostprof::profile(out, &label, || {
            for _ in 0..runs {
                decode_run(model, cache, hooks(false).as_hooks(), prompt, args.new_tokens, args.readback)?;
            }
            Ok(())
        })?;
    }
    let profile = if args.profile { Some(profile_decode(model, cache, hooks, prompt, args.readback)?) } else { None };
    Ok(Timing { runs_ms, runs_context, stats, profile, tokens_first_difference })
}

/// Where a decode step's time goes, hook by hook (decode steps only: calls with one new
/// position). `synced` false: the host's time inside each hook, i.e. enqueueing its
/// launches, what a host-bound step costs. `synced` true: the device is synced before and
/// after each hook, so each hook's time includes its GPU work, run alone.
struct ProfiledHooks<'h, B: Backend> {
    inner: Box<dyn ForwardHooksWithStats<B> + 'h>,
    device: B::Device,
    synced: bool,
    /// µs summed over decode steps: observe (the predictors), attention, MLP, norms.
    us: [f64; 4],
}

impl<B: SparseKernels> ProfiledHooks<'_, B> {
    fn timed<T>(&mut self, slot: usize, decode: bool, f: impl FnOnce(&mut dyn ForwardHooks<B>) -> T) -> T {
        if !decode {
            return f(self.inner.as_hooks());
        }
        if self.synced {
            B::sync(&self.device).expect("device sync");
        }
        let t = Instant::now();
        let out = f(self.inner.as_hooks());
        if self.synced {
            B::sync(&self.device).expect("device sync");
        }
        self.us[slot] += t.elapsed().as_secs_f64() * 1e6;
        out
    }
}

impl<B: SparseKernels> ForwardHooks<B> for ProfiledHooks<'_, B> {
    fn observe(&mut self, activation: Activation<'_, B>) {
        let decode = match &activation {
            Activation::AttentionInput { value, .. } | Activation::MlpInput { value, .. } => value.dims()[1] == 1,
            _ => false,
        };
        self.timed(0, decode, |h| h.observe(activation))
    }

    // Not timed: the decoder's input counts in the step's time outside the hooks, as
    // Burn's lookup and add do where the hooks leave it to them.
    fn embed(&mut self, tokens: &Tensor<B, 2, Int>, table: &Tensor<B, 2>, positions: &Tensor<B, 2>) -> Option<Tensor<B, 3>> {
        self.inner.as_hooks().embed(tokens, table, positions)
    }

    fn attention(
        &mut self,
        layer: usize,
        attention: &dejavu_model::attention::OptAttention<B>,
        x: Tensor<B, 3>,
        cache: &mut LayerKvCache<B>,
        step: &Step<B>,
    ) -> Tensor<B, 3> {
        let decode = x.dims()[1] == 1;
        self.timed(1, decode, |h| h.attention(layer, attention, x, cache, step))
    }

    fn mlp(&mut self, layer: usize, mlp: &dejavu_model::mlp::OptMlp<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let decode = x.dims()[1] == 1;
        self.timed(2, decode, |h| h.mlp(layer, mlp, x))
    }

    fn attention_residual(
        &mut self,
        layer: usize,
        attention: &dejavu_model::attention::OptAttention<B>,
        x: Tensor<B, 3>,
        residual: Tensor<B, 3>,
        cache: &mut LayerKvCache<B>,
        step: &Step<B>,
    ) -> Tensor<B, 3> {
        let decode = x.dims()[1] == 1;
        self.timed(1, decode, |h| h.attention_residual(layer, attention, x, residual, cache, step))
    }

    fn mlp_residual(&mut self, layer: usize, mlp: &dejavu_model::mlp::OptMlp<B>, x: Tensor<B, 3>, residual: Tensor<B, 3>) -> Tensor<B, 3> {
        let decode = x.dims()[1] == 1;
        self.timed(2, decode, |h| h.mlp_residual(layer, mlp, x, residual))
    }

    fn norm(&mut self, site: NormSite, ln: &burn::nn::LayerNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let decode = x.dims()[1] == 1;
        self.timed(3, decode, |h| h.norm(site, ln, x))
    }
}

/// Steps of a profiling run (after a warm-up): enough for a stable mean, short because
/// the synced run drains the device four times a layer.
const PROFILE_TOKENS: usize = 33;

/// µs per decode step inside each hook, host-only and synced (see [`ProfiledHooks`]), with
/// the step's total in each mode; the difference between a step and its hooks is the
/// model's own work (embedding, residual adds, LM head, reading the token back).
fn profile_decode<'h, B: SparseKernels>(
    model: &Opt<B>,
    cache: &mut KvCache<B>,
    hooks: &mut dyn FnMut(bool) -> Box<dyn ForwardHooksWithStats<B> + 'h>,
    prompt: &[u32],
    readback: Readback,
) -> anyhow::Result<Value> {
    let mut modes = serde_json::Map::new();
    let mut host_step_us = 0.0;
    for synced in [false, true] {
        let mut h = ProfiledHooks { inner: hooks(false), device: model.device(), synced, us: [0.0; 4] };
        let (step_ms, _) = decode_run(model, cache, &mut h, prompt, PROFILE_TOKENS, readback)?;
        // decode_run times the PROFILE_TOKENS − 1 one-token forwards after the prefill; the
        // hooks count exactly those calls.
        let steps = (PROFILE_TOKENS - 1) as f64;
        let [observe, attention, mlp, norm] = h.us.map(|us| us / steps);
        if !synced {
            host_step_us = step_ms * 1e3;
        }
        modes.insert(
            if synced { "synced_us" } else { "host_us" }.into(),
            json!({
                "step": step_ms * 1e3,
                "predictors": observe,
                "attention": attention,
                "mlp": mlp,
                "norms": norm,
                "outside_hooks": step_ms * 1e3 - (observe + attention + mlp + norm),
            }),
        );
    }
    let mut h = hooks(false);
    let (device_us, enqueue_us) = device_step_us(model, cache, h.as_hooks(), prompt, host_step_us)?;
    modes.insert("device_step_us".into(), json!(device_us));
    modes.insert("host_enqueue_us".into(), json!(enqueue_us));
    Ok(Value::Object(modes))
}

/// GPU time of one decode step with no launch gaps, µs: what the step would cost if the
/// host's launch cost were hidden (CUDA graphs). The GPU is first given a long job (passes
/// over a 256 MB primer, enough of them to outlast the host's enqueueing of a step three
/// times over); the step (forward, LM head and argmax, nothing read back) is enqueued
/// behind it; `t(primer + step) − t(primer)`, median of 5 after a warm-up.
///
/// Also the host's own work per step, µs: the wall time to enqueue [`ENQUEUE_STEPS`] steps
/// back to back while the GPU is still busy with a primer that outlasts them, so that the
/// host never waits on the GPU; median of 5 after a warm-up. This is the step's cost on
/// the host alone (our launchers, Burn's and CubeCL's bookkeeping, the hand-over to
/// CubeCL's device thread); where it exceeds the GPU step the host bounds decoding. It
/// leaves out the device thread's last batch of at most 64 tasks, spread over the steps,
/// and it can include waits for room in the GPU's launch queue behind the primer: on the
/// H100 it read more than the decoding step itself in some processes (runs 118–119), so
/// it is an indication, not a clean measure.
fn device_step_us<B: SparseKernels>(
    model: &Opt<B>,
    cache: &mut KvCache<B>,
    hooks: &mut dyn ForwardHooks<B>,
    prompt: &[u32],
    host_step_us: f64,
) -> anyhow::Result<(f64, f64)> {
    let device = model.device();
    prefill(model, cache, hooks, prompt)?;
    let primer = Primer::new(Tensor::<B, 1>::ones([64 << 20], (&device, DType::F32)));
    let pass_us = primer.seconds(10)? * 1e6 / 10.0;
    let n = ((3.0 * host_step_us / pass_us).ceil() as usize).max(4);
    let token = prompt[prompt.len() - 1];
    // One step enqueued: forward, LM head and argmax, nothing read back.
    let step = |cache: &mut KvCache<B>, hooks: &mut dyn ForwardHooks<B>| -> anyhow::Result<()> {
        let h = model.forward_with(token_tensor::<B>(&[token], &device), cache, hooks)?;
        greedy_token(model, h).map(drop)
    };
    let mut diffs = Vec::new();
    for rep in 0..6 {
        let primer_only = primer.seconds(n)?;
        let t = Instant::now();
        primer.prime(n);
        step(cache, hooks)?;
        primer.sync()?;
        let both = t.elapsed().as_secs_f64();
        if rep > 0 {
            diffs.push((both - primer_only) * 1e6);
        }
    }
    // The host's enqueueing alone, behind a primer of twice the time it should take.
    let long = ((2.0 * ENQUEUE_STEPS as f64 * host_step_us / pass_us).ceil() as usize).max(4);
    let mut enqueue = Vec::new();
    for rep in 0..6 {
        primer.sync()?;
        primer.prime(long);
        let t = Instant::now();
        for _ in 0..ENQUEUE_STEPS {
            step(cache, hooks)?;
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / ENQUEUE_STEPS as f64;
        primer.sync()?;
        if rep > 0 {
            enqueue.push(us);
        }
    }
    // When profiling (bench/device/ncu-step.sh): one more step, synced, inside Nsight
    // Compute's window.
    crate::capture::ncu_window(|| {
        step(cache, hooks)?;
        primer.sync()
    })?;
    Ok((median(&mut diffs), median(&mut enqueue)))
}

/// Steps enqueued back to back for the host's own work per step ([`device_step_us`]).
const ENQUEUE_STEPS: usize = 3;

/// Hooks whose kept fractions can be read after a run.
trait ForwardHooksWithStats<B: Backend> {
    fn as_hooks(&mut self) -> &mut dyn ForwardHooks<B>;
    fn stats(&self) -> Option<SparsityStats>;
}

impl<B: SparseKernels> ForwardHooksWithStats<B> for KernelDecode<'_, B> {
    fn as_hooks(&mut self) -> &mut dyn ForwardHooks<B> {
        self
    }
    fn stats(&self) -> Option<SparsityStats> {
        None
    }
}

impl<B: SparseKernels> ForwardHooksWithStats<B> for dejavu_model::SparseHooks<'_, B> {
    fn as_hooks(&mut self) -> &mut dyn ForwardHooks<B> {
        self
    }
    fn stats(&self) -> Option<SparsityStats> {
        Some(dejavu_model::SparseHooks::stats(self))
    }
}

/// One layer of the 6.7B shape, piece by piece, each timed as 500 back-to-back calls
/// (host launch cost included, as a decode loop pays it): µs per call.
fn breakdown<B: SparseKernels>(config: &OptConfig, args: &E2eArgs, device: &B::Device) -> anyhow::Result<Value> {
    use dejavu_kernels::Activation as Act;
    let dtype = args.dtype.dtype();
    let (d, ffn, heads) = (config.hidden_size, config.ffn_dim, config.num_attention_heads);
    let hd = d / heads;
    let ctx = args.prompt_lens.first().copied().unwrap_or(128);
    let rand = |shape: [usize; 2]| Tensor::<B, 2>::random(shape, burn::tensor::Distribution::Uniform(-0.05, 0.05), (device, dtype));
    let vec1 = |n: usize, dt: DType| Tensor::<B, 1>::random([n], burn::tensor::Distribution::Uniform(0.0, 0.1), (device, dt));
    let x = rand([1, d]);
    let (q, k, v, o) = (rand([d, d]), rand([d, d]), rand([d, d]), rand([d, d]));
    let (fc1, fc2) = (rand([ffn, d]), rand([ffn, d]));
    let (b_d, b_ffn) = (vec1(d, dtype), vec1(ffn, dtype));
    let (gamma, beta) = (vec1(d, DType::F32), vec1(d, DType::F32));
    let cache = Tensor::<B, 4>::random([1, heads, ctx + args.new_tokens, hd], burn::tensor::Distribution::Uniform(-1.0, 1.0), (device, dtype));
    let down = Tensor::<B, 2>::random([d, args.rank], burn::tensor::Distribution::Uniform(-0.05, 0.05), (device, DType::F32));
    let up = Tensor::<B, 2>::random([args.rank, ffn], burn::tensor::Distribution::Uniform(-0.05, 0.05), (device, DType::F32));
    let up_h = Tensor::<B, 2>::random([args.rank, heads], burn::tensor::Distribution::Uniform(-0.05, 0.05), (device, DType::F32));
    let k_heads = (args.attention_density * heads as f64).round() as i64;
    let head_idx = Tensor::<B, 1, Int>::arange_step(0..k_heads * 2, 2, device);

    let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        for _ in 0..20 {
            f()?;
        }
        let mut per = Vec::new();
        for _ in 0..3 {
            B::sync(device).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let t = Instant::now();
            for _ in 0..500 {
                f()?;
            }
            B::sync(device).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            per.push(t.elapsed().as_secs_f64() * 1e6 / 500.0);
        }
        Ok(median(&mut per))
    };
    let down_rows = down.clone().transpose().reshape([d * args.rank]).reshape([args.rank, d]);
    let up_rows = up.clone().transpose().reshape([ffn * args.rank]).reshape([ffn, args.rank]);
    let up_h_rows = up_h.clone().transpose().reshape([heads * args.rank]).reshape([heads, args.rank]);
    // A sparse layer's two LayerNorms, each with the first factor of the predictor that
    // reads its input in the same launch, the first also with this layer's head selection
    // (norm_predict); the MLP predictor's second factor runs inside the gated fc1.
    let first = dejavu_kernels::gemv(down_rows.clone(), x.clone(), None, Act::Identity)?;
    let head_select = || dejavu_kernels::HeadSelect { up: up_h_rows.clone(), h: first.clone(), threshold: 0.0, capacity: heads };
    let sparse_norms = time(&mut || {
        let _ = dejavu_kernels::norm_predict(x.clone(), gamma.clone(), beta.clone(), 1e-5, down_rows.clone(), Some(head_select()))?;
        let _ = dejavu_kernels::norm_predict(x.clone(), gamma.clone(), beta.clone(), 1e-5, down_rows.clone(), None)?;
        Ok(())
    })?;
    let kv = Tensor::cat(vec![k.clone(), v.clone()], 0);
    let b_2d = Tensor::cat(vec![b_d.clone(), b_d.clone()], 0);
    let (k_cache, v_cache) = (cache.clone(), cache.clone() + 0.0);
    let query = |heads: Option<Tensor<B, 1, Int>>| dejavu_kernels::QueryRows { w: q.clone(), heads, head_dim: hd, bias: Some(b_d.clone()) };
    let sparse_attention = time(&mut || {
        let (qs, kc, vc) =
            dejavu_kernels::qkv_append(query(Some(head_idx.clone())), kv.clone(), x.clone(), Some(b_2d.clone()), k_cache.clone(), v_cache.clone(), ctx)?;
        let a = dejavu_kernels::selected_heads_attention(qs, head_idx.clone(), kc, vc, ctx + 1, 0.088)?;
        let _ = dejavu_kernels::block_cols_gemv(o.clone(), Some((head_idx.clone(), hd)), a, Some(b_d.clone()), Some(x.clone()))?;
        Ok(())
    })?;
    // The gate at the upper 10% point of this first factor's logits.
    let mlp_threshold = quantile_threshold(dejavu_kernels::gemv(up_rows.clone(), first.clone(), None, Act::Identity)?, args.mlp_density);
    let sparse_mlp = time(&mut || {
        if args.fused_mlp {
            let mlp = dejavu_kernels::MlpWeights { w1: fc1.clone(), b1: Some(b_ffn.clone()), w2_t: fc2.clone(), b2: Some(b_d.clone()) };
            let _ = dejavu_kernels::predicted_mlp(mlp, x.clone(), Some(x.clone()), up_rows.clone(), first.clone(), mlp_threshold)?;
            return Ok(());
        }
        let h = dejavu_kernels::predicted_rows_gemv(
            fc1.clone(),
            x.clone(),
            Some(b_ffn.clone()),
            Act::Relu,
            up_rows.clone(),
            first.clone(),
            mlp_threshold,
        )?;
        let _ = dejavu_kernels::residual_transposed_gemv(x.clone(), fc2.clone(), None, h, Some(b_d.clone()))?;
        Ok(())
    })?;
    let all_heads = Tensor::<B, 1, Int>::arange(0..heads as i64, device);
    let dense_attention = time(&mut || {
        let (qd, kc, vc) = dejavu_kernels::qkv_append(query(None), kv.clone(), x.clone(), Some(b_2d.clone()), k_cache.clone(), v_cache.clone(), ctx)?;
        let a = dejavu_kernels::selected_heads_attention(qd, all_heads.clone(), kc, vc, ctx + 1, 0.088)?;
        let _ = dejavu_kernels::block_cols_gemv(o.clone(), None, a, Some(b_d.clone()), Some(x.clone()))?;
        Ok(())
    })?;
    let dense_mlp = time(&mut || {
        let h = dejavu_kernels::gemv(fc1.clone(), x.clone(), Some(b_ffn.clone()), Act::Relu)?;
        let _ = dejavu_kernels::residual_transposed_gemv(x.clone(), fc2.clone(), None, h, Some(b_d.clone()))?;
        Ok(())
    })?;
    let rest = time(&mut || {
        let _ = dejavu_kernels::layer_norm(x.clone(), gamma.clone(), beta.clone(), 1e-5)?;
        let _ = dejavu_kernels::layer_norm(x.clone(), gamma.clone(), beta.clone(), 1e-5)?;
        Ok(())
    })?;
    Ok(json!({
        "shape": args.breakdown,
        "context": ctx,
        "mlp_density": args.mlp_density,
        "attention_density": args.attention_density,
        "rank": args.rank,
        "note": "µs per call of 500 back-to-back calls (host launch cost included), median of 3, the code paths \
                 of a decode step: sparse norms = the layer's two LayerNorms, each with the first factor of the \
                 predictor reading its input (an f32 GEMV of the f16 residual) in the same launch, the first also \
                 with the heads' second factor and threshold selection (norm_predict); attention = q (gathered or dense) with \
                 every head's k and v into the cache (qkv_append, one launch) + attention + out_proj over the heads' \
                 columns with the residual add (block_cols_gemv, one pass); sparse MLP = fc1 gated by its predictor's \
                 second factor in the same launch (predicted_rows_gemv, 10% of rows above the threshold), then fc2ᵀ with the \
                 residual add (with fused_mlp: predictor, selection, fc1 and fc2ᵀ's split sums in one launch, then the \
                 splits' sum with the residual add, predicted_mlp); dense MLP = dense fc1, then fc2ᵀ with the residual \
                 add; dense norms = 2 LayerNorms",
        "us": {
            "sparse_norms_with_predictors": sparse_norms,
            "sparse_attention": sparse_attention,
            "sparse_mlp": sparse_mlp,
            "dense_attention": dense_attention,
            "dense_mlp": dense_mlp,
            "dense_norms": rest,
        }
    }))
}

struct E2eTask {
    args: E2eArgs,
    peer: Option<(Value, Value)>,
}

impl BackendTask for E2eTask {
    type Output = ();

    fn run<B: SparseKernels>(self, device: B::Device) -> anyhow::Result<()> {
        let args = &self.args;
        let dtype = args.dtype.dtype();
        let bpv = bytes_per_value(args.dtype);
        let copy_gbs = copy_bandwidth::<B>(&device, dtype)?;
        let launch_us = launch_overhead_us::<B>(&device)?;
        eprintln!("copy bandwidth {copy_gbs:.0} GB/s, launch overhead {launch_us:.1} µs");
        let mut rows: Vec<Row> = Vec::new();
        let mut checks: Vec<Value> = Vec::new();
        let report = |rows: &[Row], checks: &[Value], breakdown: Option<&Value>, done: bool| -> anyhow::Result<()> {
            write_report(args, self.peer.as_ref(), copy_gbs, launch_us, rows, checks, breakdown, done)
        };
        for name in &args.models {
            let started = Instant::now();
            let trained = name == "opt-mini";
            let (config, mut model) = if trained {
                load_model::<B>(&args.opt_mini, dtype, &device).with_context(|| format!("loading {}", args.opt_mini.display()))?
            } else {
                let Some(config) = OptConfig::named(name) else {
                    bail!("unknown model {name:?}: use opt-mini or a published OPT size such as opt-6.7b");
                };
                B::seed(&device, args.seed);
                let model = Opt::<B>::new(&config, &device).cast(dtype);
                (config, model)
            };
            let weights = use_row_major_weights(&mut model);
            let longest = args.prompt_lens.iter().copied().filter(|l| l + args.new_tokens <= config.max_position_embeddings).max().unwrap_or(1);
            // The profiling run decodes PROFILE_TOKENS whatever --new-tokens says.
            let positions = (longest + args.new_tokens.max(PROFILE_TOKENS)).min(config.max_position_embeddings);
            let mut cache = model.new_cache(1, positions)?;
            eprintln!("{name}: model ready after {:.1} s", started.elapsed().as_secs_f64());
            for &prompt_len in &args.prompt_lens {
                if prompt_len + args.new_tokens > config.max_position_embeddings {
                    eprintln!("{name}: prompt {prompt_len} + {} new tokens exceed 2048 positions; skipped", args.new_tokens);
                    continue;
                }
                let prompt: Vec<u32> = (0..prompt_len)
                    .map(|i| 3 + ((i as u64 * 7919 + 17) % (config.vocab_size as u64 - 3)) as u32)
                    .collect();
                let mean_context = prompt_len as f64 + args.new_tokens as f64 / 2.0;
                let push = |rows: &mut Vec<Row>, label: String, t: Timing, predictor_bytes: f64| {
                    let ms = median(&mut t.runs_ms.clone());
                    let bytes = bytes_per_token(&config, t.stats.as_ref(), predictor_bytes, mean_context, bpv, args.lazy_kv_window > 0);
                    let floor_ms = bytes / (copy_gbs * 1e9) * 1e3;
                    eprintln!("{name} prompt {prompt_len} {label}: {ms:.3} ms/token (floor {floor_ms:.3})");
                    rows.push(Row {
                        model: name.clone(),
                        weights: if trained { "trained" } else { "random" },
                        config: label,
                        prompt_len,
                        ms_per_token: ms,
                        runs_ms: t.runs_ms,
                        runs_context: t.runs_context,
                        kept_mlp: t.stats.as_ref().map(|s| s.mean_mlp_density()),
                        kept_attention: t.stats.as_ref().map(|s| s.mean_attention_density()),
                        bytes_per_token: bytes,
                        floor_ms,
                        over_floor: ms / floor_ms,
                        profile: t.profile,
                        tokens_first_difference: t.tokens_first_difference,
                    });
                };
                if trained && checks.is_empty() {
                    // The kernels against Burn's tensor ops on this device: greedy tokens of
                    // the trained model (a check that the timed path computes the model).
                    let options = GenerateOptions { max_new_tokens: 32, sampling: Sampling::Greedy, eos_token: None };
                    let reference = generate(&model, &mut Dense, &prompt, &options, |_| true)?.tokens;
                    let kernels = generate(&model, &mut KernelDecode::new(&weights), &prompt, &options, |_| true)?.tokens;
                    let same = reference.iter().zip(&kernels).take_while(|(a, b)| a == b).count();
                    eprintln!("{name}: kernel decode = tensor-op decode for the first {same} of {} greedy tokens", reference.len());
                    checks.push(json!({
                        "model": name,
                        "prompt_len": prompt_len,
                        "tokens": reference.len(),
                        "kernel_decode_equal_prefix": same,
                        "tensor_ops": reference,
                        "kernels": kernels,
                    }));
                }
                let pool = !args.no_step_buffer_pool;
                let dense = time_decode(&model, &mut cache, &mut |_| dense_hooks(&weights, pool), &prompt, args, &format!("{name} dense"), trained)?;
                push(&mut rows, "dense".into(), dense, 0.0);
                if trained {
                    let hash = content_hash(&args.opt_mini)?;
                    let set = PredictorSet::<B>::load(&args.opt_mini_predictors, &device)?;
                    let predictor_bytes = predictor_bytes(&set.modules, args, bpv);
                    for point in &args.opt_mini_points {
                        let plan = SparsityPlan::new(&set.manifest, point, &DenseLayers::default())?;
                        let sparse = SparseModel::with_weights(&model, &hash, plan, set.modules.clone(), sparse_options(args), weights.clone())?;
                        let label = format!("sparse {point}");
                        let t = time_decode(&model, &mut cache, &mut |count| sparse_hooks(&sparse, count, pool), &prompt, args, &format!("{name} {label}"), trained)?;
                        push(&mut rows, label, t, predictor_bytes);
                    }
                } else {
                    let setup = Instant::now();
                    B::seed(&device, args.seed.wrapping_add(1));
                    let (sparse, predictor_bytes) = synthetic_sparse(&model, &config, &weights, &mut cache, &prompt, args)?;
                    eprintln!("  synthetic predictors and thresholds {:.1} s", setup.elapsed().as_secs_f64());
                    let label = format!("sparse paper (mlp {}, attention {})", args.mlp_density, args.attention_density);
                    let t = time_decode(&model, &mut cache, &mut |count| sparse_hooks(&sparse, count, pool), &prompt, args, &format!("{name} {label}"), trained)?;
                    push(&mut rows, label, t, predictor_bytes);
                }
                report(&rows, &checks, None, false)?;
            }
        }
        let breakdown = match OptConfig::named(&args.breakdown) {
            Some(config) if !args.breakdown.is_empty() => Some(breakdown::<B>(&config, args, &device)?),
            _ => None,
        };
        report(&rows, &checks, breakdown.as_ref(), true)
    }
}

fn run_peer(args: &E2eArgs) -> anyhow::Result<Option<(Value, Value)>> {
    if args.peer_python.is_empty() {
        return Ok(None);
    }
    let lens: Vec<String> = args.prompt_lens.iter().map(|l| l.to_string()).collect();
    let peer_args: Vec<String> = vec![
        "--models".into(),
        args.models.join(","),
        "--prompt-lens".into(),
        lens.join(","),
        "--new-tokens".into(),
        args.new_tokens.to_string(),
        "--runs".into(),
        args.runs.to_string(),
        "--opt-mini".into(),
        args.opt_mini.display().to_string(),
    ];
    let value = run_peer_script(&args.peer_python, Path::new("bench/peers/hf_decode.py"), &peer_args, "transformers")?;
    Ok(value.map(|v| (v["runs_ms"].clone(), v["env"].clone())))
}

pub fn run(args: E2eArgs) -> anyhow::Result<()> {
    let peer = match &args.peer_json {
        Some(path) => {
            let value = read_json(path)?;
            Some((value["runs_ms"].clone(), value["env"].clone()))
        }
        None => run_peer(&args)?,
    };
    let backend = args.backend;
    let dtype = args.dtype;
    dispatch(backend, dtype, E2eTask { args, peer })
}

#[allow(clippy::too_many_arguments)] // one report, written from several places
fn write_report(
    args: &E2eArgs,
    peer: Option<&(Value, Value)>,
    copy_gbs: f64,
    launch_us: f64,
    rows: &[Row],
    checks: &[Value],
    breakdown: Option<&Value>,
    print: bool,
) -> anyhow::Result<()> {
    let hf = |model: &str, len: usize| -> Option<f64> {
        let runs: Vec<f64> = serde_json::from_value(peer?.0[format!("{model}@{len}")].clone()).ok()?;
        Some(median(&mut runs.clone()))
    };
    let find = |model: &str, len: usize, config: &str| {
        rows.iter().find(|r| r.model == model && r.prompt_len == len && r.config.starts_with(config)).map(|r| r.ms_per_token)
    };
    let mut summary = Vec::new();
    let mut keys: Vec<(String, usize)> = Vec::new();
    for r in rows {
        if !keys.contains(&(r.model.clone(), r.prompt_len)) {
            keys.push((r.model.clone(), r.prompt_len));
        }
    }
    for (model, len) in &keys {
        let dense = find(model, *len, "dense");
        let sparse = find(model, *len, "sparse");
        let hf_ms = hf(model, *len);
        summary.push(json!({
            "model": model,
            "prompt_len": len,
            "dense_ms": dense,
            "sparse_ms": sparse,
            "transformers_ms": hf_ms,
            "sparse_speedup_vs_dense": dense.zip(sparse).map(|(d, s)| d / s),
            "sparse_speedup_vs_transformers": hf_ms.zip(sparse).map(|(h, s)| h / s),
            "dense_speedup_vs_transformers": hf_ms.zip(dense).map(|(h, d)| h / d),
        }));
    }
    let device = device_name(&format!("{:?}", args.backend));
    let commit = commit();
    let fields = json!({
        "backend": args.backend,
        "dtype": args.dtype,
        "batch": 1,
        "prompt_lens": args.prompt_lens,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "readback": args.readback,
        "lazy_kv_window": args.lazy_kv_window,
        "predictors_in_model_dtype": args.predictors_in_model_dtype,
        "fused_mlp": args.fused_mlp,
        "f32_residual": args.f32_residual,
        "fused_attention": args.fused_attention,
        "fused_norms": args.fused_norms,
        "deferred_norms": args.deferred_norms,
        "step_buffer_pool": !args.no_step_buffer_pool,
        "seed": args.seed,
        "note": "per-token latency = decode time of the last new_tokens-1 steps / (new_tokens-1), median over runs \
                 after one warm-up run; prompts prefilled in 128-token chunks into one cache per model. kept_* come \
                 from the warm-up run (the timed runs repeat its greedy tokens without counting). Published shapes: random weights and random predictors (latency does not \
                 depend on weight values), selection by per-layer logit thresholds set from one decode step so \
                 each layer keeps about the target fraction (kept_* are measured over the timed tokens, means over \
                 all layers with dense layers counting 1). Dense decode runs through our kernels (KernelDecode); \
                 its fc2 skips rows the ReLU zeroed. Floor = bytes per token (weights read, predictors, KV of the \
                 kept heads over the mean context) / copy bandwidth measured in this run.",
        "copy_bandwidth_gbs": copy_gbs,
        "launch_overhead_us": launch_us,
        "autotune_level": std::env::var("CUBECL_AUTOTUNE_LEVEL").ok(),
        "settings": {
            "mlp_density": args.mlp_density,
            "attention_density": args.attention_density,
            "dense_last_mlp_fraction": args.dense_last_mlp_fraction,
            "rank": args.rank,
        },
        "peer": peer.map(|(_, env)| env.clone()),
        "peer_runs_ms": peer.map(|(r, _)| r.clone()),
        "rows": rows,
        "summary": summary,
        "checks": checks,
        "breakdown": breakdown,
    });
    let out = write_benchmark("e2e-decode", &device, &commit, fields, args.out.as_deref(), "e2e")?;
    if !print {
        return Ok(());
    }
    println!(
        "end-to-end decode, batch 1, {} new tokens, {:?} {:?}, tokens read back {}, {device}",
        args.new_tokens,
        args.backend,
        args.dtype,
        match args.readback {
            Readback::Step => "every step",
            Readback::End => "at the end (the host runs a step ahead)",
        }
    );
    println!("copy bandwidth {copy_gbs:.0} GB/s, host cost per launch {launch_us:.1} µs");
    println!("| model | prompt | config | ms/token | kept MLP | kept heads | floor ms | × floor |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let pct = |v: Option<f64>| v.map(|v| format!("{:.1}%", v * 100.0)).unwrap_or_else(|| "100%".into());
        println!(
            "| {} | {} | {} | {:.3} | {} | {} | {:.3} | {:.2} |",
            r.model, r.prompt_len, r.config, r.ms_per_token, pct(r.kept_mlp), pct(r.kept_attention), r.floor_ms, r.over_floor
        );
    }
    println!("| model | prompt | dense ms | sparse ms | transformers ms | sparse vs dense | sparse vs HF | dense vs HF |");
    println!("|---|---|---|---|---|---|---|---|");
    let f = |v: &Value| v.as_f64().map(|v| format!("{v:.3}")).unwrap_or_else(|| "—".into());
    for s in &summary {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            s["model"].as_str().unwrap_or(""),
            s["prompt_len"],
            f(&s["dense_ms"]),
            f(&s["sparse_ms"]),
            f(&s["transformers_ms"]),
            f(&s["sparse_speedup_vs_dense"]),
            f(&s["sparse_speedup_vs_transformers"]),
            f(&s["dense_speedup_vs_transformers"]),
        );
    }
    if rows.iter().any(|r| r.profile.is_some()) {
        println!("µs per decode step: host = time inside each hook (enqueueing), synced = device synced around each hook, device = the GPU time of a step enqueued behind a long primer");
        println!("| model | prompt | config | mode | predictors | attention | MLP | norms | outside hooks | step |");
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for r in rows {
            let Some(p) = &r.profile else { continue };
            for mode in ["host_us", "synced_us"] {
                let m = &p[mode];
                let g = |k: &str| m[k].as_f64().map(|v| format!("{v:.0}")).unwrap_or_else(|| "—".into());
                println!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.model, r.prompt_len, r.config, mode.trim_end_matches("_us"), g("predictors"), g("attention"), g("mlp"), g("norms"), g("outside_hooks"), g("step")
                );
            }
            if let Some(us) = p["device_step_us"].as_f64() {
                println!("| {} | {} | {} | device (no launch gaps) | | | | | | {us:.0} |", r.model, r.prompt_len, r.config);
            }
            if let Some(us) = p["host_enqueue_us"].as_f64() {
                println!("| {} | {} | {} | host alone (GPU busy) | | | | | | {us:.0} |", r.model, r.prompt_len, r.config);
            }
        }
    }
    if let Some(b) = breakdown {
        println!("one layer of {} (µs per call, launches included): {}", args.breakdown, b["us"]);
    }
    println!("wrote {}", out.display());
    Ok(())
}
