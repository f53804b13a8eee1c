//! `dejavu-bench`: benchmarks. `dense` measures batch-1 decode latency of our dense OPT
//! against Hugging Face `transformers` on the same shapes, in the same run, and against
//! the bytes-moved floor.

mod dense;
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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Dense(args) => dense::run(args),
    }
}
