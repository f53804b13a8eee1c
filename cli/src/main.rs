//! `dejavu`: OPT inference — text generation and perplexity — on the CPU, wgpu or CUDA.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use burn::prelude::Backend;
use clap::{Args, Parser, Subcommand};
use dejavu_model::runtime::{dispatch, SparseKernels, model_dir, BackendKind, BackendTask, Precision};
use dejavu_model::{
    generate, load_model, perplexity, Dense, GenerateOptions, OptTokenizer, PerplexityMethod,
    PerplexityReport, Sampling,
};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser, Debug)]
#[command(
    name = "dejavu",
    version,
    about = "OPT inference: generate text and measure perplexity, on the CPU, wgpu or CUDA",
    long_about = "OPT inference: generate text and measure perplexity, on the CPU, wgpu or CUDA.\n\n\
        Models are Hugging Face OPT folders (config.json, model.safetensors or \
        pytorch_model.bin, possibly sharded, and tokenizer.json or vocab.json + merges.txt). \
        Without --model the bundled assets/opt-mini is used; nothing is downloaded."
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
}

impl BackendTask for GenerateTask {
    type Output = ();

    fn run<B: SparseKernels>(self, device: B::Device) -> anyhow::Result<()> {
        let tokenizer = OptTokenizer::from_dir(&self.dir)?;
        let (_, model) = load_model::<B>(&self.dir, self.precision.dtype(), &device)
            .with_context(|| format!("loading the model from {}", self.dir.display()))?;
        let prompt = tokenizer.encode(&self.prompt)?;

        let mut stdout = std::io::stdout().lock();
        write!(stdout, "{}", self.prompt)?;
        stdout.flush()?;
        // Decode the whole continuation each step and print what is new, so multi-byte
        // characters split across tokens come out whole.
        let mut tokens = Vec::new();
        let mut printed = 0;
        let mut failure = None;
        let result = generate(&model, &mut Dense, &prompt, &self.options, |token| {
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
        Ok(())
    }
}

struct PerplexityTask {
    dir: PathBuf,
    precision: Precision,
    file: PathBuf,
    method: PerplexityMethod,
    max_tokens: Option<usize>,
}

impl BackendTask for PerplexityTask {
    type Output = PerplexityReport;

    fn run<B: SparseKernels>(self, device: B::Device) -> anyhow::Result<PerplexityReport> {
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
        let report = perplexity(&model, &mut Dense, &ids, self.method, |done, _| {
            bar.set_position(done as u64)
        })
        .with_context(|| format!("scoring {}", self.file.display()))?;
        bar.finish_and_clear();
        Ok(report)
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
            };
            let report = dispatch(model.backend, model.dtype, task)?;
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
            if let Some(path) = json {
                let value = serde_json::json!({
                    "file": file,
                    "model": dir,
                    "backend": model.backend,
                    "dtype": model.dtype,
                    "seconds": seconds,
                    "report": report,
                });
                std::fs::write(&path, serde_json::to_string_pretty(&value)? + "\n")
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
    }
}
