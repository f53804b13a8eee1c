//! `dejavu-train`: records per-layer hidden states from calibration text and trains the
//! Deja Vu sparsity predictors on them.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use burn::backend::Autodiff;
use clap::{Args, Parser, Subcommand};
use dejavu_runtime::{dispatch, SparseKernels, model_dir, BackendKind, BackendTask, Precision};
use dejavu_train::{fit, record, report, FitOptions, RecordOptions, RecordOutcome};

#[derive(Parser, Debug)]
#[command(
    name = "dejavu-train",
    version,
    about = "Record hidden states from calibration text and train the Deja Vu sparsity predictors",
    long_about = "Record hidden states from calibration text and train the Deja Vu sparsity predictors.\n\n\
        1. `record` runs the dense model over calibration text and stores, per layer and token, \
        the residuals entering attention and the MLP (F16), which fc1 neurons are active \
        (bit-packed) and each head's output norm.\n\
        2. `fit` trains one low-rank MLP-neuron and one attention-head predictor per layer on a \
        recording with burn-train's Learner, calibrates the number of outputs (K) and the logit \
        threshold that reach a target recall, and writes a predictor folder \
        (predictors.json + predictors.safetensors) with a report (table, JSON, PNG).\n\n\
        Lookahead (set when recording, default 1): layer L's predictors read layer L−1's \
        residuals (the attention predictor its attention input, the MLP predictor its MLP \
        input), so prediction can run beside layer L−1; layer 0 stays dense. With 0 they read \
        layer L's own."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}


#[derive(Args, Debug, Clone)]
struct ModelArg {
    /// Hugging Face OPT model folder [default: the bundled assets/opt-mini; env DEJAVU_MODEL]
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
}

impl ModelArg {
    fn dir(&self) -> anyhow::Result<PathBuf> {
        model_dir(self.model.as_deref())
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the dense model over calibration text and record residuals and labels.
    ///
    /// Output: sharded safetensors plus recording.json in --out. Each shard is written under
    /// a temporary name and renamed when complete; rerunning the same command after an
    /// interruption (Ctrl-C, kill -9) resumes after the last complete shard and ends with
    /// the same files as an uninterrupted run (on the CPU backend). The first --valid-rows
    /// rows come from the first documents and are used for validation only.
    Record {
        #[command(flatten)]
        model: ModelArg,
        /// Calibration text: .txt or .txt.xz (documents separated by two blank lines), or
        /// JSON lines (.jsonl[.xz]: a string or {"text": ...} per line)
        /// [default: $DEJAVU_ASSETS/text/corpus-train.txt.xz, DEJAVU_ASSETS defaulting to ../shared]
        #[arg(long, value_name = "FILE")]
        text: Option<PathBuf>,
        /// Recording folder to create (or resume)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Training rows (token positions) per layer
        #[arg(long, default_value_t = 400_000)]
        rows: usize,
        /// Validation rows per layer, from documents no training row comes from
        #[arg(long, default_value_t = 20_000)]
        valid_rows: usize,
        /// Documents are cut to this many tokens (</s> included)
        #[arg(long, default_value_t = 2048)]
        max_document_tokens: usize,
        /// Run documents at lengths rounded up to a multiple of this (padding is not
        /// recorded): fewer distinct shapes, less GPU autotuning; use the token limit on a
        /// GPU for a single shape
        #[arg(long, default_value_t = 256)]
        length_bucket: usize,
        /// Approximate shard size in MB
        #[arg(long, default_value_t = 256)]
        shard_mb: usize,
        /// 1: layer L's predictors read layer L−1's residuals (the paper's speed path);
        /// 0: layer L's own — on opt-mini the MLP predictors then need far fewer neurons
        /// for the same recall (1.1–1.6× the true density against up to 3.6×), at no extra
        /// launch in our decode step
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
        lookahead: u8,
        /// Where to run the model
        #[arg(long, value_enum, default_value = "cpu")]
        backend: BackendKind,
        /// Precision the model runs in (values are stored as F16 either way)
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Precision,
        /// Stop after writing this many shards, as if interrupted (for testing resumption)
        #[arg(long, hide = true)]
        stop_after_shards: Option<usize>,
    },
    /// Train, calibrate and save the predictors of every layer from a recording.
    ///
    /// Per layer: an MLP predictor (fc1 neuron > 0) and an attention predictor (the top
    /// --head-fraction heads by output norm), each Linear(d→r)·Linear(r→n) without bias,
    /// trained with AdamW on weighted binary cross-entropy (positives weigh 1, negatives the
    /// positive rate, +0.005 for neurons), early stopping on validation recall, the epoch
    /// with the best validation recall kept. Then K and the logit threshold reaching
    /// --target-recall on the validation rows are calibrated. With several --ranks, each is
    /// trained and the folder keeps, per layer, the smallest rank whose selected density is
    /// within 5% of the best rank's.
    ///
    /// The rows of one kind (every layer trained) are held on the training device for the
    /// whole fit, in f32: for opt-mini's 400k rows × 11 layers about 5 GB (GPU memory with
    /// --backend cuda). A larger rank usually needs fewer neurons for the same recall (on
    /// opt-mini, rank 256 against 128), and a recording with --lookahead 0 far fewer.
    Fit(FitArgs),
}

#[derive(Args, Debug)]
struct FitArgs {
    /// A folder made by `dejavu-train record`
    #[arg(long, value_name = "DIR")]
    recording: PathBuf,
    #[command(flatten)]
    model: ModelArg,
    /// Predictor folder to write (training state goes to DIR/training)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Ranks of the MLP predictors to train (comma-separated)
    #[arg(long, value_delimiter = ',', default_value = "128")]
    ranks: Vec<usize>,
    /// Ranks of the attention predictors [default: the --ranks]
    #[arg(long, value_delimiter = ',')]
    attention_ranks: Option<Vec<usize>>,
    /// Most epochs per predictor
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Stop after this many epochs without a better validation recall
    #[arg(long, default_value_t = 5)]
    patience: usize,
    #[arg(long, default_value_t = 1024)]
    batch_size: usize,
    /// AdamW learning rate of the MLP predictors
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// AdamW learning rate of the attention predictors
    #[arg(long, default_value_t = 1e-3)]
    attention_lr: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Attention label: this fraction of heads, by output norm, per token (at least one)
    #[arg(long, default_value_t = 0.3)]
    head_fraction: f64,
    /// Recall the MLP calibration must reach on validation rows
    #[arg(long, default_value_t = 0.99)]
    target_recall: f64,
    /// Recall the attention calibration must reach
    #[arg(long, default_value_t = 0.99)]
    attention_target_recall: f64,
    /// Train only these layers (comma-separated)
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Train only these kinds of predictor (comma-separated) [default: both]
    #[arg(long, value_enum, value_delimiter = ',')]
    kinds: Vec<dejavu_train::dataset::PredictorKind>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Data-loading threads. 0 builds batches on the training thread; keep 0 with
    /// --backend cuda: with loader threads GPU memory grew until allocation failed on
    /// the H100 (tensors made on another thread's CubeCL stream were apparently not
    /// reused)
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Continue an interrupted fit from its checkpoints (finished predictors are kept)
    #[arg(long)]
    resume: bool,
    /// Where to train: cpu (Flex) or cuda (CubeBackend without fusion) or wgpu
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    /// The report plot [default: OUT/fit-report.png]
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
}

struct RecordTask(RecordOptions);

impl BackendTask for RecordTask {
    type Output = RecordOutcome;
    fn run<B: SparseKernels>(self, device: B::Device) -> anyhow::Result<RecordOutcome> {
        Ok(record::<B>(&self.0, &device)?)
    }
}

struct FitTask(FitOptions);

impl BackendTask for FitTask {
    type Output = dejavu_train::FitReport;
    fn run<B: SparseKernels>(self, device: B::Device) -> anyhow::Result<dejavu_train::FitReport> {
        Ok(fit::<Autodiff<B>>(&self.0, &device)?)
    }
}

fn main() -> anyhow::Result<()> {
    // CubeCL's default autotuning times every candidate kernel for each new matmul shape:
    // up to ~40 s per new shape on the H100 (measured), longer than training a predictor. The
    // minimal level keeps it to a few candidates; set CUBECL_AUTOTUNE_LEVEL to override.
    if std::env::var_os("CUBECL_AUTOTUNE_LEVEL").is_none() {
        std::env::set_var("CUBECL_AUTOTUNE_LEVEL", "minimal");
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,burn_train=warn,cubecl_runtime=warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match Cli::parse().command {
        Command::Record { model, text, out, rows, valid_rows, max_document_tokens, length_bucket, shard_mb, lookahead, backend, dtype, stop_after_shards } => {
            let text = text.unwrap_or_else(|| dejavu_model::shared_assets_dir().join("text/corpus-train.txt.xz"));
            if !text.is_file() {
                bail!("calibration text {} does not exist (pass --text or set DEJAVU_ASSETS)", text.display());
            }
            let options = RecordOptions {
                model: model.dir()?,
                text,
                out: out.clone(),
                train_rows: rows,
                valid_rows,
                max_document_tokens,
                length_bucket,
                shard_bytes: shard_mb.max(1) << 20,
                lookahead: lookahead as usize,
                dtype: dtype.dtype(),
                progress,
                stop_after_shards,
            };
            let start = Instant::now();
            match dispatch(backend, dtype, RecordTask(options)).context("recording")? {
                RecordOutcome::Complete(m) => {
                    let bytes: u64 = m.shards.iter().filter_map(|s| std::fs::metadata(out.join(&s.file)).ok()).map(|m| m.len()).sum();
                    println!(
                        "recorded {} training rows ({} documents) and {} validation rows ({} documents) in {} shards, {:.2} GB, in {:.1} s: {}",
                        m.train_rows,
                        m.train_documents,
                        m.valid_rows,
                        m.valid_documents,
                        m.shards.len(),
                        bytes as f64 / 1e9,
                        start.elapsed().as_secs_f64(),
                        out.display()
                    );
                }
                RecordOutcome::Stopped { shards_written } => {
                    println!("stopped after {shards_written} shards as asked; rerun without --stop-after-shards to finish");
                }
            }
        }
        Command::Fit(args) => {
            if !(0.0..=1.0).contains(&args.head_fraction) || !(0.0..=1.0).contains(&args.target_recall) || !(0.0..=1.0).contains(&args.attention_target_recall) {
                bail!("--head-fraction and the target recalls must be between 0 and 1");
            }
            let (out, backend, plot) = (args.out.clone(), args.backend, args.plot.clone());
            let options = FitOptions {
                recording: args.recording,
                model: args.model.dir()?,
                out: args.out,
                attention_ranks: args.attention_ranks.unwrap_or_else(|| args.ranks.clone()),
                mlp_ranks: args.ranks,
                epochs: args.epochs,
                patience: args.patience,
                batch_size: args.batch_size,
                mlp_learning_rate: args.lr,
                attention_learning_rate: args.attention_lr,
                weight_decay: args.weight_decay,
                head_fraction: args.head_fraction,
                mlp_target_recall: args.target_recall,
                attention_target_recall: args.attention_target_recall,
                layers: args.layers,
                kinds: args.kinds,
                seed: args.seed,
                workers: args.workers,
                resume: args.resume,
                progress,
            };
            let report = dispatch(backend, Precision::F32, FitTask(options)).context("training the predictors")?;
            print!("{}", report::table(&report));
            println!("predictors written to {} in {:.1} s (report: {})", out.display(), report.seconds, out.join(dejavu_train::fit::REPORT_FILE).display());
            let plot = plot.unwrap_or_else(|| out.join("fit-report.png"));
            match report::plot(&report, &plot) {
                Ok(()) => println!("plot: {}", plot.display()),
                Err(e) => eprintln!("warning: no plot: {e}"),
            }
        }
    }
    Ok(())
}
