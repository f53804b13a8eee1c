//! `dejavu-bench`: benchmarks. `dense` measures batch-1 decode latency of our dense OPT
//! against Hugging Face `transformers` on the same shapes, in the same run, and against
//! the bytes-moved floor. `kernels` measures the sparse GEMV kernels against dense GEMV
//! and PyTorch peers across densities. `quality` measures perplexity and zero-shot accuracy
//! against sparsity on a model with trained predictors.

mod dense;
mod capture;
mod e2e;
mod hostprof;
mod kernels;
mod launch;
mod primer;
mod quality;
mod report;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "dejavu-bench", version, about = "dejavu benchmarks (results as JSON under bench/results/)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Batch-1 decode latency per token of the dense model, with random weights for
    /// published OPT shapes (made in-process from their configs) and the bundled opt-mini,
    /// against Hugging Face transformers (fp16, eager) run by bench/peers/hf_decode.py.
    Dense(dense::DenseArgs),
    /// The sparse MLP kernels (gathered fc1, gathered transposed fc2, selection, our dense
    /// GEMV) at OPT shapes across densities, against PyTorch (cuBLAS GEMV, index_select +
    /// GEMV, a contiguous slice) run by bench/peers/torch_kernels.py; `--check` first
    /// verifies every kernel against host loops at the same shapes.
    Kernels(kernels::KernelArgs),
    /// Quality against sparsity on one model with its predictors: perplexity of WikiText-2
    /// and the corpus valid split, dense and across MLP / attention densities and named
    /// operating points (every token sparse), and zero-shot accuracy dense against one
    /// operating point.
    Quality(quality::QualityArgs),
    /// End-to-end batch-1 decode latency per token: our dense model, our sparse model at
    /// the paper's latency setting (synthetic OPT shapes, random weights and predictors) and
    /// at opt-mini's operating points (trained predictors), Hugging Face transformers
    /// (bench/peers/hf_decode.py), against each configuration's bytes floor; host cost per
    /// launch; a one-layer breakdown.
    E2e(e2e::E2eArgs),
    /// Host cost of one CubeCL launch, by what it carries (tensor or array arguments, an
    /// allocated output): 2,000 back-to-back launches of a kernel that does almost nothing.
    Launch(launch::LaunchArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Dense(args) => dense::run(args),
        Command::Kernels(args) => kernels::run(args),
        Command::Quality(args) => quality::run(args),
        Command::E2e(args) => e2e::run(args),
        Command::Launch(args) => launch::run(args),
    }
}
