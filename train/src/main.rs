//! `dejavu-train`: records per-layer hidden states from calibration text and trains the
//! sparsity predictors. Not built yet: the recording and training are the work of the
//! predictor-training issue; this binary exists so the workspace has its final shape, and
//! it says so instead of pretending.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "dejavu-train", version, about = "Record hidden states and train sparsity predictors (not implemented yet)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Record per-layer residuals and labels from calibration text (not implemented yet)
    Record,
    /// Train the MLP and attention predictors (not implemented yet)
    Fit,
}

fn main() -> anyhow::Result<()> {
    let name = match Cli::parse().command {
        Command::Record => "record",
        Command::Fit => "fit",
    };
    anyhow::bail!("`dejavu-train {name}` is not implemented yet (see the predictor-training issue)")
}
