//! `dejavu`: OPT inference — text generation, perplexity and zero-shot evaluation, dense or
//! through the Deja Vu sparse path — on the CPU, wgpu or CUDA.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use dejavu_runtime::{dispatch, model_dir, tasks_or_all, BackendKind, BackendTask, Precision, SparseKernels, TaskArg};
use dejavu_model::zeroshot::{self, Task, TaskReport};
use dejavu_model::{
    generate, load_model, perplexity, use_row_major_weights, Dense, ForwardHooks, KernelDecode, GenerateOptions, Opt, OptTokenizer, PerplexityMethod,
    PerplexityReport, Sampling, SparseModel, SparseOptions, SparsityStats,
};
use dejavu_predictor::{DenseLayers, OperatingPoint};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser, Debug)]
#[command(
    name = "dejavu",
    version,
    about = "OPT inference, dense or Deja Vu sparse: generate text, measure perplexity, zero-shot tasks",
    long_about = "OPT inference, dense or Deja Vu sparse: generate text, measure perplexity, score \
        zero-shot tasks, on the CPU, wgpu or CUDA.\n\n\
        Models are Hugging Face OPT folders (config.json, model.safetensors or \
        pytorch_model.bin, possibly sharded, and tokenizer.json or vocab.json + merges.txt). \
        Without --model the bundled assets/opt-mini is used; nothing is downloaded.\n\n\
        With --predictors (a folder from `dejavu-train fit`; bare --predictors means the \
        bundled assets/opt-mini-predictors) each layer's predictors pick the MLP neurons \
        and attention heads to compute; --operating-point says how many."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// Hugging Face OPT model folder [default: the bundled assets/opt-mini; env DEJAVU_MODEL]
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Where to run
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    /// Precision of weights and activations (softmax, log-softmax and logits stay f32)
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Precision,
}

#[derive(Args, Debug, Clone)]
struct SparseArgs {
    /// Run the Deja Vu sparse path with these predictors (a `dejavu-train fit` folder);
    /// bare --predictors: the bundled assets/opt-mini-predictors [default: dense]
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    predictors: Option<Option<PathBuf>>,
    /// How many neurons and heads each layer keeps: `calibrated` (each layer's K for recall
    /// 0.99 on validation rows), `threshold` (each layer's calibrated logit threshold),
    /// `scale=F` (each layer's calibrated K times F), or fixed densities such as
    /// `mlp=0.1,attention=0.5` (a kind left out keeps its calibrated K)
    #[arg(long, value_name = "POINT", default_value = "calibrated", requires = "predictors")]
    operating_point: OperatingPoint,
    /// Layers whose MLP stays dense (comma-separated), besides those without a predictor
    #[arg(long, value_name = "LAYERS", value_delimiter = ',', requires = "predictors")]
    dense_mlp_layers: Vec<usize>,
    /// Layers whose attention stays dense (comma-separated)
    #[arg(long, value_name = "LAYERS", value_delimiter = ',', requires = "predictors")]
    dense_attention_layers: Vec<usize>,
    /// Pick MLP neurons by their true fc1 pre-activation instead of the predictor (an
    /// upper bound on predictor quality; no faster than dense)
    #[arg(long, requires = "predictors")]
    oracle_mlp: bool,
    /// Pick heads by the norm of their true output instead of the predictor (an upper
    /// bound on head-predictor quality; every head is computed, then masked)
    #[arg(long, requires = "predictors")]
    oracle_attention: bool,
    /// Decoding one sequence, write keys and values only for the heads each step reads,
    /// recomputing a head's missed tokens from the inputs of the last N steps when it is
    /// next read (exact; the reference uses 16). 0, the default, writes every head's at
    /// every step, which measured faster on the H100
    #[arg(long, requires = "predictors", default_value_t = 0, value_name = "N")]
    lazy_kv_window: usize,
    /// Decoding one sequence, read the predictors in the model's dtype (f16: half their
    /// bytes; sums stay f32) instead of f32, in which they were trained and calibrated
    #[arg(long, requires = "predictors")]
    predictors_in_model_dtype: bool,
    /// Decoding one sequence, run each step's MLP as one fused kernel (predictor, selection,
    /// fc1 and fc2 in one launch, then the residual add) instead of the separate kernels;
    /// the same result up to f32 summation order. Faster on the H100 only at the 6.7B shape
    #[arg(long, requires = "predictors")]
    fused_mlp: bool,
    /// Decoding one sequence (pre-LN models, not with --fused-mlp), keep each step's
    /// residual stream in f32: out_proj adds into it, and fc2 too in one launch with f32
    /// atomics (a launch a layer fewer; the order of the f32 additions varies between runs)
    #[arg(long, requires = "predictors", conflicts_with = "fused_mlp")]
    f32_residual: bool,
    /// With --f32-residual: each sparse layer's attention and out_proj in one launch
    /// (each cube computes its head's attention, then adds its rows of out_proj)
    #[arg(long, requires = "f32_residual")]
    fused_attention: bool,
    /// With --f32-residual: no LayerNorm launches in sparse layers (the launch that
    /// finishes the residual writes its LayerNorm from its last cube, and the next layer's
    /// predictors ride in the next launches); four launches a sparse layer with
    /// --fused-attention
    #[arg(long, requires = "f32_residual")]
    fused_norms: bool,
    /// With --fused-norms: no launch writes a sparse layer's attention LayerNorm; its
    /// qkv_append applies it to the f32 residual itself (fc2 before it then ends with its adds)
    #[arg(long, requires = "fused_norms")]
    deferred_norms: bool,
}

/// The sparse path's settings once the command line is read.
#[derive(Debug, Clone)]
struct SparseChoice {
    predictors: PathBuf,
    point: OperatingPoint,
    dense: DenseLayers,
    /// The oracles, the K/V write and the predictor dtype; `every_token` is set by the
    /// command that loads the model.
    options: SparseOptions,
}

impl SparseArgs {
    fn choice(&self) -> Option<SparseChoice> {
        let predictors = self.predictors.as_ref()?.clone().unwrap_or_else(dejavu_model::default_predictors_dir);
        Some(SparseChoice {
            predictors,
            point: self.operating_point.clone(),
            dense: DenseLayers { mlp: self.dense_mlp_layers.clone(), attention: self.dense_attention_layers.clone() },
            options: SparseOptions {
                every_token: false,
                oracle_mlp: self.oracle_mlp,
                oracle_attention: self.oracle_attention,
                lazy_kv_window: self.lazy_kv_window,
                predictors_in_model_dtype: self.predictors_in_model_dtype,
                fused_mlp: self.fused_mlp,
                f32_residual: self.f32_residual,
                fused_attention: self.fused_attention,
                fused_norms: self.fused_norms,
                deferred_norms: self.deferred_norms,
            },
        })
    }
}

impl SparseChoice {
    /// What a JSON result says of the sparse run: its settings and what it kept.
    fn json(&self, kept: Option<&SparsityStats>) -> serde_json::Value {
        serde_json::json!({
            "predictors": self.predictors,
            "operating_point": self.point.to_string(),
            "dense_mlp_layers": self.dense.mlp,
            "dense_attention_layers": self.dense.attention,
            "oracle_mlp": self.options.oracle_mlp,
            "oracle_attention": self.options.oracle_attention,
            "lazy_kv_window": self.options.lazy_kv_window,
            "predictors_in_model_dtype": self.options.predictors_in_model_dtype,
            "fused_mlp": self.options.fused_mlp,
            "f32_residual": self.options.f32_residual,
            "fused_attention": self.options.fused_attention,
            "fused_norms": self.options.fused_norms,
            "deferred_norms": self.options.deferred_norms,
            "kept": kept,
        })
    }

    fn load<B: SparseKernels>(&self, model: &Opt<B>, dir: &std::path::Path, every_token: bool) -> anyhow::Result<SparseModel<B>> {
        let options = SparseOptions { every_token, ..self.options };
        let sparse = SparseModel::load(model, dir, &self.predictors, &self.point, &self.dense, options)?;
        let plan = sparse.plan();
        let density = |d: Option<f64>| d.map_or("varies per token".to_string(), |d| format!("{:.1}%", d * 100.0));
        eprintln!(
            "sparse: {} from {} — MLP density {}, attention density {} (means over all layers, dense layers counting 100%)",
            plan.operating_point,
            self.predictors.display(),
            density(plan.mlp_density()),
            density(plan.attention_density()),
        );
        Ok(sparse)
    }
}

/// Writes a JSON result, pretty-printed.
fn write_json(path: &std::path::Path, value: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n").with_context(|| format!("writing {}", path.display()))
}

/// Prints what the sparse path kept.
fn report_stats(stats: &SparsityStats) {
    let list = |v: &[Option<f64>]| {
        v.iter().map(|d| d.map_or("dense".to_string(), |d| format!("{:.3}", d))).collect::<Vec<_>>().join(" ")
    };
    eprintln!(
        "kept per token: MLP {:.1}% of neurons, attention {:.1}% of heads (all layers; per layer MLP [{}], heads [{}])",
        stats.mean_mlp_density() * 100.0,
        stats.mean_attention_density() * 100.0,
        list(&stats.mlp),
        list(&stats.attention)
    );
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Continue a prompt, printing tokens as they are produced, then tokens/s
    Generate {
        /// The text to continue
        prompt: String,
        #[command(flatten)]
        model: ModelArgs,
        /// How many tokens to add
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Sample instead of taking the most likely token (greedy)
        #[arg(long)]
        sample: bool,
        /// Softmax temperature when sampling
        #[arg(long, default_value_t = 1.0, requires = "sample")]
        temperature: f32,
        /// Sample only among the K most likely tokens
        #[arg(long, value_name = "K", requires = "sample")]
        top_k: Option<usize>,
        /// Sample only among the most likely tokens whose probabilities sum to P
        #[arg(long, value_name = "P", requires = "sample")]
        top_p: Option<f32>,
        /// Random seed when sampling
        #[arg(long, default_value_t = 0, requires = "sample")]
        seed: u64,
        /// Keep going after the end-of-sequence token </s>
        #[arg(long)]
        ignore_eos: bool,
        #[command(flatten)]
        sparse: SparseArgs,
        /// With --predictors: make the prompt sparse too (by default it runs dense, as in
        /// the reference, and only decoded tokens are sparse)
        #[arg(long, requires = "predictors")]
        sparse_prompt: bool,
        /// Also write the prompt and new token ids, the text and timings as JSON here
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Perplexity of a text file.
    ///
    /// Default: the Hugging Face perplexity guide's strided windows (--window tokens,
    /// advancing by --stride; each token is scored once, with up to window − stride tokens
    /// of context). With --non-overlapping: the OPT/GPTQ papers' convention, consecutive
    /// non-overlapping windows of --window tokens (2048 by default there), the tail
    /// shorter than a window dropped. The text is read with line endings normalized to \n
    /// (as Python reads it) and encoded once with </s> prepended.
    Perplexity {
        /// A UTF-8 text file, e.g. WikiText-2 test joined with blank lines
        file: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
        /// Window length in tokens [default: 1024, or 2048 with --non-overlapping]
        #[arg(long)]
        window: Option<usize>,
        /// Step between window starts (strided mode only)
        #[arg(long, default_value_t = 512, conflicts_with = "non_overlapping")]
        stride: usize,
        /// Non-overlapping windows (OPT/GPTQ convention) instead of strided ones
        #[arg(long)]
        non_overlapping: bool,
        /// Score only the first N tokens of the text
        #[arg(long, value_name = "N")]
        max_tokens: Option<usize>,
        /// Also write the result as JSON here
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// With --predictors every token is scored through the sparse path (masked: each
        /// token keeps its own neurons and heads, equal to the gathered kernels run token
        /// by token)
        #[command(flatten)]
        sparse: SparseArgs,
    },
    /// Zero-shot accuracy on multiple-choice tasks, by log-likelihood (lm-evaluation-harness
    /// style).
    ///
    /// Prompts, per task: COPA the premise with its connective, choices " {choice}"; PIQA
    /// "Question: {goal}\nAnswer:", " {solution}"; OpenBookQA the question stem, " {choice}";
    /// WinoGrande each filled-in sentence start, scoring the shared rest (partial scoring);
    /// LAMBADA the passage, accuracy = the last word is the greedy continuation; CB
    /// "{premise}\nQuestion: {hypothesis}. True, False, or Neither?\nAnswer:", " True" /
    /// " False" / " Neither"; RTE "{premise}\nQuestion: {hypothesis} True or False?\nAnswer:",
    /// " True" / " False". acc_norm divides log-likelihoods by the choice's length in
    /// characters. With --predictors every token is sparse.
    Eval {
        /// Tasks to run (comma-separated) [default: all]
        #[arg(long, value_enum, value_delimiter = ',')]
        task: Vec<TaskArg>,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sparse: SparseArgs,
        /// Folder of the task files [default: $DEJAVU_ASSETS/tasks, DEJAVU_ASSETS defaulting to ../shared]
        #[arg(long, value_name = "DIR")]
        tasks_dir: Option<PathBuf>,
        /// Only the first N examples of each task
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Also write the results as JSON here
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
}

impl ModelArgs {
    fn dir(&self) -> anyhow::Result<PathBuf> {
        model_dir(self.model.as_deref())
    }
}

struct GenerateTask {
    dir: PathBuf,
    precision: Precision,
    prompt: String,
    options: GenerateOptions,
    sparse: Option<SparseChoice>,
    sparse_prompt: bool,
    json: Option<PathBuf>,
    backend: BackendKind,
}

impl BackendTask for GenerateTask {
    type Output = ();

    fn run<B: SparseKernels>(self, device: B::Device) -> anyhow::Result<()> {
        let tokenizer = OptTokenizer::from_dir(&self.dir)?;
        let (_, mut model) = load_model::<B>(&self.dir, self.precision.dtype(), &device)
            .with_context(|| format!("loading the model from {}", self.dir.display()))?;
        // The layout the decode kernels read, made in place (no copy of the weights).
        let decode = B::has_kernels().then(|| use_row_major_weights(&mut model));
        let prompt = tokenizer.encode(&self.prompt)?;
        let sparse = self.sparse.as_ref().map(|s| s.load(&model, &self.dir, self.sparse_prompt)).transpose()?;
        let mut sparse_hooks = sparse.as_ref().map(|s| s.hooks());
        // Dense: decode steps through the kernels where the backend has them.
        let mut kernel_hooks = decode.as_ref().filter(|_| sparse.is_none()).map(KernelDecode::new);
        let hooks: &mut dyn ForwardHooks<B> = match (&mut sparse_hooks, &mut kernel_hooks) {
            (Some(h), _) => h,
            (None, Some(k)) => k,
            (None, None) => &mut Dense,
        };

        let mut stdout = std::io::stdout().lock();
        write!(stdout, "{}", self.prompt)?;
        stdout.flush()?;
        // Decode the whole continuation each step and print what is new, so multi-byte
        // characters split across tokens come out whole.
        let mut tokens = Vec::new();
        let mut printed = 0;
        let mut failure = None;
        let result = generate(&model, hooks, &prompt, &self.options, |token| {
            tokens.push(token);
            match tokenizer.decode(&tokens) {
                Ok(text) if !text.ends_with('\u{FFFD}') => {
                    let _ = write!(stdout, "{}", &text[printed.min(text.len())..]);
                    let _ = stdout.flush();
                    printed = text.len();
                }
                Ok(_) => {}
                Err(e) => failure = Some(e),
            }
            failure.is_none()
        })?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        writeln!(stdout)?;
        eprintln!(
            "{} prompt tokens, {} new tokens; prefill {:.1} ms, decode {:.1} tokens/s",
            prompt.len(),
            result.tokens.len(),
            result.prefill.as_secs_f64() * 1e3,
            result.decode_tokens_per_second()
        );
        let stats = sparse_hooks.as_ref().map(|h| h.stats());
        if let Some(stats) = &stats {
            report_stats(stats);
        }
        if let Some(path) = &self.json {
            let value = serde_json::json!({
                "model": self.dir,
                "backend": self.backend,
                "dtype": self.precision,
                "prompt": self.prompt,
                "prompt_tokens": prompt,
                "new_tokens": result.tokens,
                "text": tokenizer.decode(&result.tokens)?,
                "prefill_ms": result.prefill.as_secs_f64() * 1e3,
                "decode_tokens_per_second": result.decode_tokens_per_second(),
                "sparse": self.sparse.as_ref().map(|c| c.json(stats.as_ref())),
                "sparse_prompt": self.sparse.is_some() && self.sparse_prompt,
            });
            write_json(path, &value)?;
        }
        Ok(())
    }
}

struct PerplexityTask {
    dir: PathBuf,
    precision: Precision,
    file: PathBuf,
    method: PerplexityMethod,
    max_tokens: Option<usize>,
    sparse: Option<SparseChoice>,
}

impl BackendTask for PerplexityTask {
    type Output = (PerplexityReport, Option<SparsityStats>);

    fn run<B: SparseKernels>(self, device: B::Device) -> anyhow::Result<Self::Output> {
        let text = dejavu_model::text::read_text(&self.file)?;
        let tokenizer = OptTokenizer::from_dir(&self.dir)?;
        let (_, model) = load_model::<B>(&self.dir, self.precision.dtype(), &device)
            .with_context(|| format!("loading the model from {}", self.dir.display()))?;
        let mut ids = tokenizer.encode(&text)?;
        if let Some(max) = self.max_tokens {
            ids.truncate(max);
        }
        let windows = self.method.windows(ids.len())?.len();
        let bar = ProgressBar::new(windows as u64).with_style(
            ProgressStyle::with_template(
                "{spinner} perplexity [{bar:30}] {pos}/{len} windows, {per_sec}, eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        let sparse = self.sparse.as_ref().map(|s| s.load(&model, &self.dir, true)).transpose()?;
        // None: dense.
        let mut sparse_hooks = sparse.as_ref().map(|s| s.hooks());
        let report = perplexity(&model, &mut sparse_hooks, &ids, self.method, |done, _| bar.set_position(done as u64))
            .with_context(|| format!("scoring {}", self.file.display()))?;
        bar.finish_and_clear();
        Ok((report, sparse_hooks.map(|h| h.stats())))
    }
}

struct EvalTask {
    dir: PathBuf,
    precision: Precision,
    tasks: Vec<(Task, Vec<zeroshot::Example>)>,
    sparse: Option<SparseChoice>,
}

impl BackendTask for EvalTask {
    type Output = (Vec<TaskReport>, Option<SparsityStats>);

    fn run<B: SparseKernels>(self, device: B::Device) -> anyhow::Result<Self::Output> {
        let tokenizer = OptTokenizer::from_dir(&self.dir)?;
        let (_, model) = load_model::<B>(&self.dir, self.precision.dtype(), &device)
            .with_context(|| format!("loading the model from {}", self.dir.display()))?;
        let sparse = self.sparse.as_ref().map(|s| s.load(&model, &self.dir, true)).transpose()?;
        // None: dense.
        let mut sparse_hooks = sparse.as_ref().map(|s| s.hooks());
        let mut reports = Vec::new();
        for (task, examples) in &self.tasks {
            let bar = ProgressBar::new(examples.len() as u64).with_style(
                ProgressStyle::with_template("{spinner} {msg:10} [{bar:30}] {pos}/{len} examples, {per_sec}, eta {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_message(task.name());
            let report = zeroshot::evaluate(&model, &mut sparse_hooks, &tokenizer, *task, examples, |done| bar.set_position(done as u64))
                .with_context(|| format!("evaluating {}", task.name()))?;
            bar.finish_and_clear();
            eprintln!("{}: accuracy {:.4} ± {:.4} over {} examples", task.name(), report.accuracy, report.accuracy_stderr, report.examples);
            reports.push(report);
        }
        Ok((reports, sparse_hooks.map(|h| h.stats())))
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Generate {
            prompt,
            model,
            max_new_tokens,
            sample,
            temperature,
            top_k,
            top_p,
            seed,
            ignore_eos,
            sparse,
            sparse_prompt,
            json,
        } => {
            let sampling = if sample {
                Sampling::Random {
                    temperature,
                    top_k,
                    top_p,
                    seed,
                }
            } else {
                Sampling::Greedy
            };
            let task = GenerateTask {
                dir: model.dir()?,
                precision: model.dtype,
                prompt,
                options: GenerateOptions {
                    max_new_tokens,
                    sampling,
                    eos_token: (!ignore_eos).then_some(dejavu_model::tokenizer::OPT_BOS),
                },
                sparse: sparse.choice(),
                sparse_prompt,
                json,
                backend: model.backend,
            };
            dispatch(model.backend, model.dtype, task)
        }
        Command::Perplexity {
            file,
            model,
            window,
            stride,
            non_overlapping,
            max_tokens,
            json,
            sparse,
        } => {
            let method = if non_overlapping {
                PerplexityMethod::NonOverlapping {
                    window: window.unwrap_or(2048),
                }
            } else {
                PerplexityMethod::Strided {
                    window: window.unwrap_or(1024),
                    stride,
                }
            };
            let started = Instant::now();
            let dir = model.dir()?;
            let task = PerplexityTask {
                dir: dir.clone(),
                precision: model.dtype,
                file: file.clone(),
                method,
                max_tokens,
                sparse: sparse.choice(),
            };
            let (report, stats) = dispatch(model.backend, model.dtype, task)?;
            let seconds = started.elapsed().as_secs_f64();
            println!(
                "perplexity {:.4} over {} tokens ({} windows) of {} [{:?}, {:?}, {:.1} s]",
                report.perplexity,
                report.tokens_scored,
                report.windows,
                file.display(),
                model.backend,
                model.dtype,
                seconds
            );
            if let Some(stats) = &stats {
                report_stats(stats);
            }
            if let Some(path) = json {
                let value = serde_json::json!({
                    "file": file,
                    "model": dir,
                    "backend": model.backend,
                    "dtype": model.dtype,
                    "seconds": seconds,
                    "report": report,
                    "sparse": sparse.choice().map(|c| c.json(stats.as_ref())),
                });
                write_json(&path, &value)?;
            }
            Ok(())
        }
        Command::Eval { task, model, sparse, tasks_dir, limit, json } => {
            let tasks_dir = tasks_dir.unwrap_or_else(|| dejavu_model::shared_assets_dir().join("tasks"));
            let names = tasks_or_all(&task);
            let mut tasks = Vec::new();
            for t in names {
                let mut examples = t.load(&tasks_dir.join(t.file_name()))?;
                if let Some(n) = limit {
                    examples.truncate(n);
                }
                tasks.push((t, examples));
            }
            let started = Instant::now();
            let dir = model.dir()?;
            let task = EvalTask { dir: dir.clone(), precision: model.dtype, tasks, sparse: sparse.choice() };
            let (reports, stats) = dispatch(model.backend, model.dtype, task)?;
            let seconds = started.elapsed().as_secs_f64();
            println!("{:<11} {:>8} {:>9} {:>8} {:>9} {:>10}", "task", "examples", "accuracy", "stderr", "acc_norm", "perplexity");
            for r in &reports {
                let opt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}", prec = p));
                println!(
                    "{:<11} {:>8} {:>9.4} {:>8.4} {:>9} {:>10}",
                    r.task.name(),
                    r.examples,
                    r.accuracy,
                    r.accuracy_stderr,
                    opt(r.accuracy_norm, 4),
                    opt(r.perplexity, 2)
                );
            }
            if let Some(stats) = &stats {
                report_stats(stats);
            }
            if let Some(path) = json {
                let value = serde_json::json!({
                    "model": dir,
                    "backend": model.backend,
                    "dtype": model.dtype,
                    "seconds": seconds,
                    "limit": limit,
                    "tasks": reports,
                    "sparse": sparse.choice().map(|c| c.json(stats.as_ref())),
                });
                write_json(&path, &value)?;
            }
            Ok(())
        }
    }
}
