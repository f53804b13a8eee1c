//! `dejavu-bench dense`: batch-1 decode latency per token, ours against `transformers`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use dejavu_model::config::POSITION_OFFSET;
use dejavu_runtime::{dispatch, SparseKernels, BackendKind, BackendTask, Precision};
use dejavu_model::{generate, load_model, use_row_major_weights, Dense, ForwardHooks, GenerateOptions, KernelDecode, Opt, OptConfig, Sampling};
use serde::Serialize;
use serde_json::Value;

use crate::report::{commit, device_name, median, read_json, run_peer_script, write_benchmark};

#[derive(clap::Args, Debug, Clone)]
pub struct DenseArgs {
    /// Models: `opt-mini` (the bundled trained model) or a published shape
    /// (opt-125m, opt-1.3b, opt-6.7b, opt-13b, opt-30b) with random weights
    #[arg(long, value_delimiter = ',', default_value = "opt-mini,opt-1.3b,opt-6.7b")]
    models: Vec<String>,
    #[arg(long, value_enum, default_value = "cuda")]
    backend: BackendKind,
    #[arg(long, value_enum, default_value = "f16")]
    dtype: Precision,
    /// Prompt length in tokens (prefilled, not timed)
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// New tokens per run; the per-token latency is the time of the last N − 1 steps / (N − 1)
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Timed runs per model (after one untimed warm-up run)
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The bundled trained model
    #[arg(long, default_value = "assets/opt-mini")]
    opt_mini: PathBuf,
    /// Read the transformers peer's results from this JSON (written by
    /// bench/peers/hf_decode.py) instead of running it
    #[arg(long, value_name = "FILE")]
    peer_json: Option<PathBuf>,
    /// Python that runs bench/peers/hf_decode.py (transformers, fp16, eager); empty to skip
    #[arg(long, default_value = "python3")]
    peer_python: String,
    /// Also compute each model's perplexity on the first --check-tokens tokens of this text
    /// (strided 1024/512), a sanity check that the timed configuration computes the right thing
    #[arg(long, value_name = "FILE")]
    check_text: Option<PathBuf>,
    #[arg(long, default_value_t = 8192)]
    check_tokens: usize,
    /// Where to write the JSON [default: bench/results/dense-<commit>.json]
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Serialize, Clone)]
struct Shape {
    hidden: usize,
    layers: usize,
    heads: usize,
    ffn: usize,
    vocab: usize,
}

#[derive(Debug, Serialize, Clone)]
struct Row {
    model: String,
    weights: &'static str,
    shape: Shape,
    parameters: usize,
    /// Median over runs of the mean decode-step latency.
    ours_ms_per_token: f64,
    ours_runs_ms: Vec<f64>,
    hf_ms_per_token: Option<f64>,
    hf_runs_ms: Option<Vec<f64>>,
    /// transformers time / ours (> 1: we are faster).
    speedup_vs_hf: Option<f64>,
    /// Perplexity of the first tokens of --check-text (opt-mini only: random weights say nothing).
    check_perplexity: Option<f64>,
    weight_bytes_per_token: f64,
    kv_bytes_per_token: f64,
    floor_ms: f64,
    ours_over_floor: f64,
}

struct MeasureTask {
    args: DenseArgs,
    peer: Option<(Value, Value)>,
}

/// One model's measurement: name, weights, config, per-run ms/token, check perplexity.
type Measured = (String, &'static str, OptConfig, Vec<f64>, Option<f64>);

/// Bytes a decode step must read: every weight once, except the position table (one row)
/// and the token embedding rows (the tied LM head reads the whole table anyway).
fn weight_bytes(config: &OptConfig, bytes_per_value: f64) -> f64 {
    let positions = (config.max_position_embeddings + POSITION_OFFSET) * config.hidden_size;
    (config.num_parameters() - positions + config.hidden_size) as f64 * bytes_per_value
}

/// KV bytes read by an average step: keys and values of every layer over the mean context.
fn kv_bytes(config: &OptConfig, mean_context: f64, bytes_per_value: f64) -> f64 {
    2.0 * config.num_hidden_layers as f64 * mean_context * config.hidden_size as f64 * bytes_per_value
}

pub(crate) fn bytes_per_value(p: Precision) -> f64 {
    match p {
        Precision::F32 => 4.0,
        Precision::F16 | Precision::Bf16 => 2.0,
    }
}

/// Copies of the 1 GiB tensor between two syncs in [`copy_bandwidth`] (their outputs held
/// until the sync, so that a fusing backend cannot drop them unread).
const COPIES_PER_BURST: usize = 4;

/// Device copy bandwidth: read + write of a 1 GiB tensor, timed over bursts of
/// [`COPIES_PER_BURST`] copies enqueued back to back between two syncs (median of 6 bursts
/// after a warm-up one). One copy between two syncs also timed the host's sync, and a slow
/// host then read as a slow device: single copies gave 2596 GB/s in one process where the
/// others of its calls gave 2720–2840 (run 63).
pub(crate) fn copy_bandwidth<B: Backend>(device: &B::Device, dtype: DType) -> anyhow::Result<f64> {
    let values = (1usize << 30) / dtype.size();
    let x = Tensor::<B, 1>::random([values], Distribution::Default, (device, dtype));
    let mut times = Vec::new();
    for i in 0..7 {
        B::sync(device).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let t = Instant::now();
        let outputs: Vec<_> = (0..COPIES_PER_BURST).map(|_| x.clone().mul_scalar(1.0001)).collect();
        B::sync(device).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let elapsed = t.elapsed().as_secs_f64();
        drop(outputs);
        if i > 0 {
            times.push(elapsed / COPIES_PER_BURST as f64);
        }
    }
    Ok(2.0 * (1u64 << 30) as f64 / median(&mut times) / 1e9)
}

impl BackendTask for MeasureTask {
    type Output = ();

    fn run<B: SparseKernels>(self, device: B::Device) -> anyhow::Result<()> {
        let args = self.args;
        let dtype = args.dtype.dtype();
        let copy_gbs = copy_bandwidth::<B>(&device, dtype)?;
        eprintln!("copy bandwidth {copy_gbs:.0} GB/s");
        let mut rows = Vec::new();
        for name in &args.models {
            let (config, model, weights) = if name == "opt-mini" {
                let (config, model) = load_model::<B>(&args.opt_mini, dtype, &device)
                    .with_context(|| format!("loading {}", args.opt_mini.display()))?;
                (config, model, "trained")
            } else {
                let Some(config) = OptConfig::named(name) else {
                    bail!("unknown model {name:?}: use opt-mini or a published OPT size such as opt-6.7b");
                };
                // Random weights: decode latency does not depend on their values.
                let model = Opt::<B>::new(&config, &device).cast(dtype);
                (config, model, "random")
            };
            // Decode steps through our kernels where the backend has them.
            let mut model = model;
            let decode = B::has_kernels().then(|| use_row_major_weights(&mut model));
            let mut kernel_hooks = decode.as_ref().map(KernelDecode::new);
            let hooks: &mut dyn ForwardHooks<B> = match &mut kernel_hooks {
                Some(k) => k,
                None => &mut Dense,
            };
            let prompt: Vec<u32> = (0..args.prompt_len)
                .map(|i| 3 + ((i as u64 * 7919 + 17) % (config.vocab_size as u64 - 3)) as u32)
                .collect();
            let options = GenerateOptions {
                max_new_tokens: args.new_tokens,
                sampling: Sampling::Greedy,
                eos_token: None,
            };
            // Warm-up: kernel compilation and autotune happen here, not in the timed runs.
            let warm = Instant::now();
            generate(&model, hooks, &prompt, &options, |_| true)?;
            eprintln!("{name}: warm-up {:.1} s", warm.elapsed().as_secs_f64());
            let mut runs = Vec::new();
            for _ in 0..args.runs {
                let g = generate(&model, hooks, &prompt, &options, |_| true)?;
                let steps = (g.tokens.len() - 1).max(1) as f64;
                runs.push(g.decode.as_secs_f64() * 1e3 / steps);
            }
            eprintln!("{name}: {:.3} ms/token (median of {})", median(&mut runs.clone()), runs.len());
            let check = match (&args.check_text, weights) {
                (Some(path), "trained") => {
                    let text = dejavu_model::text::read_text(path)?;
                    let tokenizer = dejavu_model::OptTokenizer::from_dir(&args.opt_mini)?;
                    let mut ids = tokenizer.encode(&text)?;
                    ids.truncate(args.check_tokens);
                    let method = dejavu_model::PerplexityMethod::Strided { window: 1024, stride: 512 };
                    let report = dejavu_model::perplexity(&model, hooks, &ids, method, |_, _| {})?;
                    eprintln!("{name}: perplexity {:.4} on {} tokens of {}", report.perplexity, ids.len(), path.display());
                    Some(report.perplexity)
                }
                _ => None,
            };
            rows.push((name.clone(), weights, config, runs, check));
            drop(model);
            // Written after every model, so a run cut short keeps what it measured.
            write_report(&args, self.peer.as_ref(), copy_gbs, &rows, rows.len() == args.models.len())?;
        }
        Ok(())
    }
}

/// Runs the transformers peer; its JSON maps model name → per-run ms/token.
fn run_peer(args: &DenseArgs) -> anyhow::Result<Option<(Value, Value)>> {
    if args.peer_python.is_empty() {
        return Ok(None);
    }
    let mut peer_args: Vec<String> = vec!["--models".into(), args.models.join(",")];
    for (flag, value) in [("--prompt-len", args.prompt_len), ("--new-tokens", args.new_tokens), ("--runs", args.runs)] {
        peer_args.extend([flag.to_string(), value.to_string()]);
    }
    peer_args.extend(["--opt-mini".to_string(), args.opt_mini.display().to_string()]);
    let value = run_peer_script(&args.peer_python, Path::new("bench/peers/hf_decode.py"), &peer_args, "transformers")?;
    Ok(value.map(|v| (v["runs_ms"].clone(), v["env"].clone())))
}

pub fn run(args: DenseArgs) -> anyhow::Result<()> {
    // The peer first: it is quick, and its numbers are then in every partial report.
    let peer = match &args.peer_json {
        Some(path) => {
            let value = read_json(path)?;
            Some((value["runs_ms"].clone(), value["env"].clone()))
        }
        None => run_peer(&args)?,
    };
    dispatch(args.backend, args.dtype, MeasureTask { args, peer })
}

fn write_report(
    args: &DenseArgs,
    peer: Option<&(Value, Value)>,
    copy_gbs: f64,
    measured: &[Measured],
    print: bool,
) -> anyhow::Result<()> {
    let bpv = bytes_per_value(args.dtype);
    let mean_context = args.prompt_len as f64 + args.new_tokens as f64 / 2.0;

    let mut rows = Vec::new();
    for (name, weights, config, runs, check_perplexity) in measured.iter().cloned() {
        let mut runs = runs;
        let ours = median(&mut runs.clone());
        let hf_runs: Option<Vec<f64>> = peer
            .and_then(|(r, _)| serde_json::from_value(r[&name].clone()).ok());
        let hf = hf_runs.as_ref().map(|r| median(&mut r.clone()));
        let wb = weight_bytes(&config, bpv);
        let kb = kv_bytes(&config, mean_context, bpv);
        let floor_ms = (wb + kb) / (copy_gbs * 1e9) * 1e3;
        runs.sort_by(f64::total_cmp);
        rows.push(Row {
            model: name,
            weights,
            shape: Shape {
                hidden: config.hidden_size,
                layers: config.num_hidden_layers,
                heads: config.num_attention_heads,
                ffn: config.ffn_dim,
                vocab: config.vocab_size,
            },
            parameters: config.num_parameters(),
            ours_ms_per_token: ours,
            ours_runs_ms: runs,
            hf_ms_per_token: hf,
            hf_runs_ms: hf_runs,
            speedup_vs_hf: hf.map(|h| h / ours),
            check_perplexity,
            weight_bytes_per_token: wb,
            kv_bytes_per_token: kb,
            floor_ms,
            ours_over_floor: ours / floor_ms,
        });
    }

    let device = device_name(&format!("{:?}", args.backend));
    let commit = commit();
    let fields = serde_json::json!({
        "backend": args.backend,
        "dtype": args.dtype,
        "batch": 1,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "decode": if matches!(args.backend, BackendKind::Cuda) { "kernels (KernelDecode)" } else { "tensor ops" },
        "note": "per-token latency = decode time of the last new_tokens-1 steps / (new_tokens-1), \
                 median over runs after one warm-up run; random weights for published shapes \
                 (latency does not depend on their values); floor = (weight + mean KV bytes) / \
                 measured copy bandwidth",
        "copy_bandwidth_gbs": copy_gbs,
        "autotune_level": std::env::var("CUBECL_AUTOTUNE_LEVEL").ok(),
        "peer": peer.map(|(_, env)| env.clone()),
        "rows": rows,
    });
    let out = write_benchmark("dense-decode", &device, &commit, fields, args.out.as_deref(), "dense")?;
    if !print {
        return Ok(());
    }

    println!("dense decode, batch 1, prompt {} + {} new tokens, {:?} {:?}, {device}", args.prompt_len, args.new_tokens, args.backend, args.dtype);
    println!("copy bandwidth {copy_gbs:.0} GB/s");
    println!("| model | weights | ours ms/token | transformers ms/token | speedup vs HF | floor ms | ours / floor | check ppl |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let opt = |v: Option<f64>, p: usize| v.map(|v| format!("{v:.p$}")).unwrap_or_else(|| "—".into());
        println!(
            "| {} | {} | {:.3} | {} | {} | {:.3} | {:.2} | {} |",
            r.model, r.weights, r.ours_ms_per_token, opt(r.hf_ms_per_token, 3), opt(r.speedup_vs_hf, 2), r.floor_ms, r.ours_over_floor,
            opt(r.check_perplexity, 3)
        );
    }
    println!("wrote {}", out.display());
    Ok(())
}
