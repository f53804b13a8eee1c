//! Sparsity predictors for Deja Vu: per layer, a low-rank linear classifier over the
//! residual stream that scores every MLP neuron ([`MlpPredictor`]) or attention head
//! ([`AttentionPredictor`]), and the saved artifact (`predictors.json` + safetensors) that
//! training writes and sparse inference loads.
//!
//! Calibration of K and the logit threshold for a target recall is here ([`calibrate`]),
//! and the [`SparsityPlan`] that sparse inference follows; training is in `train/`.
//! Depends on nothing of `model`, `train` or `bench`.

mod artifact;
pub mod calibration;
mod classifier;
mod plan;

pub use artifact::{ArtifactError, LayerEntry, Manifest, OutputEntry, PredictorModules, PredictorSet, MANIFEST_FILE, WEIGHTS_FILE};
pub use calibration::{calibrate, Calibration};
pub use classifier::{AttentionPredictor, LowRankClassifier, LowRankClassifierConfig, MlpPredictor};
pub use plan::{DenseLayers, LayerPlan, ModelDims, OperatingPoint, PlanError, Selection, SparsityPlan};
