//! The predictor folder: `predictors.json` (the [`Manifest`]) and `predictors.safetensors`
//! (the weights, keys `mlp.<layer>.{down,up}.weight` and `attention.<layer>...`, Burn's
//! `[in, out]` layout). Both are written to a temporary name and renamed when complete, so
//! an interrupted save never leaves a half-written artifact under the real names.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use serde::{Deserialize, Serialize};

use crate::classifier::{LowRankClassifier, LowRankClassifierConfig};

pub const MANIFEST_FILE: &str = "predictors.json";
pub const WEIGHTS_FILE: &str = "predictors.safetensors";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid predictors.json: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{path}: {what}")]
    Weights { path: PathBuf, what: String },
}

/// What one predictor of one layer is, and how it was calibrated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputEntry {
    pub rank: usize,
    /// Outputs kept at the calibrated operating point (neurons or heads).
    pub k: Option<usize>,
    /// Logit threshold reaching the target recall.
    pub threshold: Option<f32>,
    /// Recall and density (K / outputs) of top-K selection, measured on validation rows.
    pub recall: Option<f64>,
    pub density: Option<f64>,
    /// Recall and mean density of selecting by `logit ≥ threshold` instead.
    #[serde(default)]
    pub threshold_recall: Option<f64>,
    #[serde(default)]
    pub threshold_density: Option<f64>,
    /// The true density (fraction of positive labels) on the validation rows.
    #[serde(default)]
    pub true_density: Option<f64>,
}

impl OutputEntry {
    /// A predictor of rank `rank` with an operating point (`k`, `threshold`) but no
    /// measurements: synthetic predictors for benchmarks and tests.
    pub fn unmeasured(rank: usize, k: Option<usize>, threshold: Option<f32>) -> Self {
        Self {
            rank,
            k,
            threshold,
            recall: None,
            density: None,
            threshold_recall: None,
            threshold_density: None,
            true_density: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerEntry {
    pub layer: usize,
    /// `None`: this layer's MLP (or attention) stays dense.
    pub mlp: Option<OutputEntry>,
    pub attention: Option<OutputEntry>,
}

/// `predictors.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Content hash of the model the predictors were trained for.
    pub model_hash: String,
    pub hidden_size: usize,
    pub ffn_dim: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    /// 0: layer l's inputs predict layer l; 1: they predict layer l + 1 (the paper's
    /// speed path: prediction runs beside layer l). Training pairs inputs and labels the
    /// same way.
    pub lookahead: usize,
    pub layers: Vec<LayerEntry>,
}

impl Manifest {
    fn validate(&self, path: &Path) -> Result<(), ArtifactError> {
        let bad = |what: String| Err(ArtifactError::Invalid { path: path.to_path_buf(), what });
        if self.format != FORMAT {
            return bad(format!("format {} is not supported (this build reads format {FORMAT})", self.format));
        }
        if self.lookahead > 1 {
            return bad(format!("lookahead {} is not 0 or 1", self.lookahead));
        }
        if self.layers.len() != self.num_layers {
            return bad(format!("{} layer entries for num_layers {}", self.layers.len(), self.num_layers));
        }
        for (i, entry) in self.layers.iter().enumerate() {
            if entry.layer != i {
                return bad(format!("layer entry {i} says layer {}", entry.layer));
            }
            for (kind, e, outputs) in [("mlp", &entry.mlp, self.ffn_dim), ("attention", &entry.attention, self.num_heads)] {
                if let Some(e) = e {
                    if e.rank == 0 {
                        return bad(format!("layer {i} {kind} predictor has rank 0"));
                    }
                    if e.k.is_some_and(|k| k > outputs) {
                        return bad(format!("layer {i} {kind}: k {} exceeds its {outputs} outputs", e.k.unwrap_or(0)));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The weights: per layer, an optional MLP and attention predictor.
#[derive(Module, Debug)]
pub struct PredictorModules<B: Backend> {
    pub mlp: Vec<Option<LowRankClassifier<B>>>,
    pub attention: Vec<Option<LowRankClassifier<B>>>,
}

impl<B: Backend> PredictorModules<B> {
    /// The same predictors with f32 weights. Predictors are trained and stored in f32, but
    /// parameters made (or loaded) while a device's default float dtype is f16 come out in
    /// f16; their logits are computed in f32.
    pub fn into_f32(mut self) -> Self {
        for p in self.mlp.iter_mut().chain(self.attention.iter_mut()).flatten() {
            for w in [&mut p.down.weight, &mut p.up.weight] {
                let t = w.val();
                if t.dtype() != burn::tensor::DType::F32 {
                    *w = burn::module::Param::from_tensor(t.cast(burn::tensor::DType::F32));
                }
            }
        }
        self
    }
}

/// A loaded (or freshly made) predictor folder.
#[derive(Debug)]
pub struct PredictorSet<B: Backend> {
    pub manifest: Manifest,
    pub modules: PredictorModules<B>,
}

fn skeleton<B: Backend>(manifest: &Manifest, device: &B::Device) -> PredictorModules<B> {
    let make = |e: &Option<OutputEntry>, outputs: usize| {
        e.as_ref().map(|e| LowRankClassifierConfig::new(manifest.hidden_size, e.rank, outputs).init::<B>(device))
    };
    PredictorModules {
        mlp: manifest.layers.iter().map(|l| make(&l.mlp, manifest.ffn_dim)).collect(),
        attention: manifest.layers.iter().map(|l| make(&l.attention, manifest.num_heads)).collect(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io { path: path.to_path_buf(), source }
}

impl<B: Backend> PredictorSet<B> {
    /// Randomly initialised predictors with the manifest's shapes (what training starts from).
    pub fn init(manifest: Manifest, device: &B::Device) -> Result<Self, ArtifactError> {
        manifest.validate(Path::new(MANIFEST_FILE))?;
        let modules = skeleton(&manifest, device);
        Ok(Self { manifest, modules })
    }

    /// Writes `dir/predictors.safetensors` and `dir/predictors.json`, each through a
    /// temporary file renamed when complete.
    pub fn save(&self, dir: &Path) -> Result<(), ArtifactError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let weights = dir.join(WEIGHTS_FILE);
        let tmp = dir.join(format!("{WEIGHTS_FILE}.tmp"));
        let mut store = SafetensorsStore::from_file(&tmp).overwrite(true);
        self.modules
            .save_into(&mut store)
            .map_err(|e| ArtifactError::Weights { path: tmp.clone(), what: format!("{e:?}") })?;
        std::fs::rename(&tmp, &weights).map_err(io(&weights))?;
        let manifest = dir.join(MANIFEST_FILE);
        let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let text = serde_json::to_string_pretty(&self.manifest)
            .map_err(|source| ArtifactError::Json { path: manifest.clone(), source })?;
        std::fs::write(&tmp, text + "\n").map_err(io(&tmp))?;
        std::fs::rename(&tmp, &manifest).map_err(io(&manifest))
    }

    /// Reads a predictor folder; every tensor the manifest implies must be there with its
    /// shape.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, ArtifactError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|source| ArtifactError::Json { path: path.clone(), source })?;
        manifest.validate(&path)?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.exists() {
            return Err(ArtifactError::Io {
                path: weights,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no predictor weights"),
            });
        }
        let mut modules = skeleton::<B>(&manifest, device);
        let mut store = SafetensorsStore::from_file(&weights);
        let result = modules
            .load_from(&mut store)
            .map_err(|e| ArtifactError::Weights { path: weights.clone(), what: format!("{e:?}") })?;
        if !result.missing.is_empty() || !result.errors.is_empty() {
            return Err(ArtifactError::Weights {
                path: weights,
                what: format!("missing tensors {:?}; errors {:?}", result.missing, result.errors),
            });
        }
        Ok(Self { manifest, modules })
    }
}
