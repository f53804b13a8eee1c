//! Sparsity predictors for Deja Vu: per layer, a low-rank linear classifier over the
//! residual stream that scores every MLP neuron ([`MlpPredictor`]) or attention head
//! ([`AttentionPredictor`]), and the saved artifact (`predictors.json` + safetensors) that
//! training writes and sparse inference loads.
//!
//! Still to come (issues 3 and 5): training (in `train/`), calibration of K and the logit
//! threshold, and the `SparsityPlan`. Depends on nothing of `model`, `train` or `bench`.

mod artifact;
mod classifier;

pub use artifact::{ArtifactError, LayerEntry, Manifest, OutputEntry, PredictorSet, MANIFEST_FILE, WEIGHTS_FILE};
pub use classifier::{AttentionPredictor, LowRankClassifier, LowRankClassifierConfig, MlpPredictor};
