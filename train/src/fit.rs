//! `dejavu-train fit`: trains every layer's MLP and attention predictors on a recording
//! with burn-train's `Learner`, calibrates them on validation rows, and writes the
//! predictor folder that sparse inference loads.
//!
//! Loss: binary cross-entropy on the logits, each element weighted `y·(1 − w) + w` with w
//! the training rows' positive rate (+ 0.005 for MLP neurons), as the reference does:
//! positives weigh 1 and the many negatives about the positive rate, which favours recall.
//! Computed stably as `y·softplus(−z) + w·(1 − y)·softplus(z)`, averaged over elements.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::data::dataloader::DataLoaderBuilder;
use burn::optim::AdamWConfig;
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn::tensor::backend::AutodiffBackend;
use burn::train::checkpoint::{ComposedCheckpointingStrategy, KeepLastNCheckpoints, MetricCheckpointingStrategy};
use burn::train::metric::store::{Aggregate, Direction, Split as MetricSplit};
use burn::train::{InferenceStep, Learner, LearnerSummary, MetricEarlyStoppingStrategy, StoppingCondition, SupervisedTraining, TrainOutput, TrainStep};
use dejavu_predictor::{calibrate, Calibration, LayerEntry, LowRankClassifier, LowRankClassifierConfig, Manifest, OutputEntry, PredictorSet};
use serde::{Deserialize, Serialize};

use crate::dataset::{load_pair, PairRows, PredictorKind, RowBatch, RowBatcher, RowIndices};
use crate::error::TrainError;
use crate::metrics::{CountMetric, PredictorOutput, Quantity};
use crate::progress::BarRenderer;
use crate::recording::{read_json, write_json, RecordingManifest, Split};

/// Training settings.
#[derive(Debug, Clone)]
pub struct FitOptions {
    pub recording: PathBuf,
    /// The model the recording was made from (its content hash is checked).
    pub model: PathBuf,
    /// The predictor folder to write; training state goes to `out/training/`.
    pub out: PathBuf,
    pub mlp_ranks: Vec<usize>,
    pub attention_ranks: Vec<usize>,
    pub epochs: usize,
    /// Early stopping: epochs without a better validation recall.
    pub patience: usize,
    pub batch_size: usize,
    pub mlp_learning_rate: f64,
    pub attention_learning_rate: f64,
    pub weight_decay: f64,
    /// Attention label: this fraction of heads (by output norm) per token.
    pub head_fraction: f64,
    pub mlp_target_recall: f64,
    pub attention_target_recall: f64,
    /// Train only these layers' predictors (all when `None`).
    pub layers: Option<Vec<usize>>,
    pub seed: u64,
    pub workers: usize,
    /// Continue an interrupted run from its checkpoints instead of starting over.
    pub resume: bool,
    pub progress: bool,
}

/// One epoch's validation (and training) metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: Option<f64>,
    pub valid_loss: Option<f64>,
    pub recall: Option<f64>,
    pub precision: Option<f64>,
    pub predicted_density: Option<f64>,
    pub true_density: Option<f64>,
}

/// A trained and calibrated predictor (`result.json` in its training folder).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainedPredictor {
    pub kind: PredictorKind,
    pub layer: usize,
    pub rank: usize,
    pub input: String,
    pub label: String,
    pub train_rows: usize,
    pub valid_rows: usize,
    /// `w` of the loss's weighting.
    pub negative_weight: f64,
    pub epochs: Vec<EpochMetrics>,
    /// The epoch kept (highest validation recall).
    pub best_epoch: usize,
    pub calibration: Calibration,
    pub seconds: f64,
}

/// What `fit` produced: every trained predictor, and per layer and kind the one chosen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitReport {
    pub recording: String,
    pub model_hash: String,
    pub lookahead: usize,
    pub head_fraction: f64,
    pub trained: Vec<TrainedPredictor>,
    /// (kind, layer, rank) chosen for the predictor folder.
    pub chosen: Vec<(PredictorKind, usize, usize)>,
    pub seconds: f64,
}

pub const REPORT_FILE: &str = "fit-report.json";

/// The training module: the classifier and its loss weighting.
#[derive(Module, Debug)]
pub struct PredictorTraining<B: Backend> {
    pub classifier: LowRankClassifier<B>,
    /// Weight of a negative element in the loss (`w`).
    pub negative_weight: f64,
}

/// `softplus(z) = max(z, 0) + ln(1 + e^{−|z|})`, without overflow.
fn softplus<B: Backend>(z: Tensor<B, 2>) -> Tensor<B, 2> {
    z.clone().clamp_min(0.0) + z.abs().neg().exp().log1p()
}

impl<B: Backend> PredictorTraining<B> {
    fn forward_step(&self, batch: RowBatch<B>) -> (Tensor<B, 1>, PredictorOutput<B>) {
        let z = self.classifier.forward(batch.inputs);
        let y = batch.targets;
        let [rows, outputs] = z.dims();
        let sp = softplus(z.clone());
        // softplus(−z) = softplus(z) − z.
        let per_element = y.clone() * (sp.clone() - z.clone()) + (y.clone().neg() + 1.0) * sp * self.negative_weight;
        let loss = per_element.mean();
        let predicted = z.greater_elem(0.0).float();
        let counts = Tensor::cat(
            vec![(predicted.clone() * y.clone()).sum(), predicted.sum(), y.sum()],
            0,
        );
        let output = PredictorOutput { loss: loss.clone().detach(), counts, rows, elements: rows * outputs };
        (loss, output)
    }
}

impl<B: AutodiffBackend> TrainStep for PredictorTraining<B> {
    type Input = RowBatch<B>;
    type Output = PredictorOutput<B>;

    fn step(&self, batch: RowBatch<B>) -> TrainOutput<PredictorOutput<B>> {
        let (loss, output) = self.forward_step(batch);
        TrainOutput::new(self, loss.backward(), output)
    }
}

impl<B: Backend> InferenceStep for PredictorTraining<B> {
    type Input = RowBatch<B>;
    type Output = PredictorOutput<B>;

    fn step(&self, batch: RowBatch<B>) -> PredictorOutput<B> {
        self.forward_step(batch).1
    }
}

type Recorder = NamedMpkFileRecorder<FullPrecisionSettings>;

/// The last epoch with a complete checkpoint (model, optimizer, scheduler) in `dir`.
fn last_checkpoint(dir: &Path) -> Option<usize> {
    let entries = std::fs::read_dir(dir.join("checkpoint")).ok()?;
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            let epoch: usize = name.strip_prefix("model-")?.strip_suffix(".mpk")?.parse().ok()?;
            ["optim", "scheduler"].iter().all(|p| dir.join("checkpoint").join(format!("{p}-{epoch}.mpk")).exists()).then_some(epoch)
        })
        .max()
}

/// Reads the per-epoch metrics Burn logged under `dir`.
fn epoch_metrics(dir: &Path, epochs: usize) -> Result<Vec<EpochMetrics>, TrainError> {
    let names: Vec<&str> = Quantity::ALL.iter().map(|q| q.name()).collect();
    let summary = LearnerSummary::new(dir, &names).map_err(|e| TrainError::recording(dir, format!("cannot read the training logs: {e}")))?;
    let value = |list: &[burn::train::MetricSummary], name: &str, epoch: usize| {
        list.iter().find(|m| m.name == name).and_then(|m| m.entries.iter().find(|e| e.step == epoch)).map(|e| e.value)
    };
    Ok((1..=epochs.max(summary.epochs))
        .map(|epoch| EpochMetrics {
            epoch,
            train_loss: value(&summary.metrics.train, "Loss", epoch),
            valid_loss: value(&summary.metrics.valid, "Loss", epoch),
            recall: value(&summary.metrics.valid, "Recall", epoch),
            precision: value(&summary.metrics.valid, "Precision", epoch),
            predicted_density: value(&summary.metrics.valid, "Predicted density", epoch),
            true_density: value(&summary.metrics.valid, "True density", epoch),
        })
        .filter(|m| m.recall.is_some())
        .collect())
}

/// Logits `[rows, outputs]` of `model` on every row of `rows`, on the host.
fn all_logits<B: Backend>(model: &LowRankClassifier<B>, rows: &Arc<PairRows>, device: &B::Device) -> Vec<f32> {
    let batcher = RowBatcher { rows: rows.clone() };
    let mut out = Vec::with_capacity(rows.rows * rows.outputs);
    let step = 4096;
    for start in (0..rows.rows).step_by(step) {
        let items: Vec<usize> = (start..(start + step).min(rows.rows)).collect();
        let batch: RowBatch<B> = burn::data::dataloader::batcher::Batcher::batch(&batcher, items, device);
        let logits = model.forward(batch.inputs);
        out.extend(logits.into_data().convert::<f32>().into_vec::<f32>().expect("f32"));
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn train_one<B: AutodiffBackend>(
    options: &FitOptions,
    work: &Path,
    label: String,
    kind: PredictorKind,
    rank: usize,
    negative_weight: f64,
    train: &Arc<PairRows>,
    valid: &Arc<PairRows>,
    device: &B::Device,
) -> Result<(LowRankClassifier<B::InnerBackend>, Vec<EpochMetrics>, usize), TrainError> {
    let resume_epoch = if options.resume { last_checkpoint(work) } else { None };
    if resume_epoch.is_none() && work.exists() {
        std::fs::remove_dir_all(work).map_err(|source| TrainError::Io { path: work.to_path_buf(), source })?;
    }
    std::fs::create_dir_all(work).map_err(|source| TrainError::Io { path: work.to_path_buf(), source })?;
    B::seed(device, options.seed);
    let model = PredictorTraining::<B> {
        classifier: LowRankClassifierConfig::new(train.inputs_width, rank, train.outputs).init(device),
        negative_weight,
    };
    let dl_train = DataLoaderBuilder::new(RowBatcher { rows: train.clone() })
        .batch_size(options.batch_size)
        .shuffle(options.seed)
        .num_workers(options.workers)
        .set_device(device.clone())
        .build(RowIndices(train.rows));
    let dl_valid = DataLoaderBuilder::<B::InnerBackend, _, _>::new(RowBatcher { rows: valid.clone() })
        .batch_size(options.batch_size * 4)
        .num_workers(options.workers)
        .set_device(device.clone())
        .build(RowIndices(valid.rows));
    let recall = CountMetric::new(Quantity::Recall);
    let mut training = SupervisedTraining::new(work, dl_train, dl_valid)
        .with_file_checkpointer(Recorder::new())
        .with_checkpointing_strategy(
            ComposedCheckpointingStrategy::builder()
                .add(KeepLastNCheckpoints::new(1))
                .add(MetricCheckpointingStrategy::new(&recall, Aggregate::Mean, Direction::Highest, MetricSplit::Valid))
                .build(),
        )
        .early_stopping(MetricEarlyStoppingStrategy::new(
            &recall,
            Aggregate::Mean,
            Direction::Highest,
            MetricSplit::Valid,
            StoppingCondition::NoImprovementSince { n_epochs: options.patience },
        ))
        .num_epochs(options.epochs)
        .renderer(BarRenderer::new(label, options.progress))
        .with_application_logger(None);
    for q in Quantity::ALL {
        training = training.metric_train_numeric(CountMetric::new(q)).metric_valid_numeric(CountMetric::new(q));
    }
    if let Some(epoch) = resume_epoch {
        if epoch < options.epochs {
            training = training.checkpoint(epoch);
        }
    }
    let lr = match kind {
        PredictorKind::Mlp => options.mlp_learning_rate,
        PredictorKind::Attention => options.attention_learning_rate,
    };
    let optimizer = AdamWConfig::new().with_weight_decay(options.weight_decay as f32).init();
    if resume_epoch.is_none_or(|e| e < options.epochs) {
        let _ = training.launch(Learner::new(model, optimizer, lr));
    }

    let epochs = epoch_metrics(work, options.epochs)?;
    // The checkpointing strategy keeps the last epoch and the one with the best
    // validation recall; of the checkpoints on disk, take the best (the earliest on ties).
    let kept: Vec<&EpochMetrics> = epochs.iter().filter(|e| work.join("checkpoint").join(format!("model-{}.mpk", e.epoch)).is_file()).collect();
    let best = kept
        .iter()
        .fold(None::<&EpochMetrics>, |best, e| match best {
            Some(b) if b.recall >= e.recall => Some(b),
            _ => Some(e),
        })
        .ok_or_else(|| TrainError::recording(work.join("checkpoint"), "training left no model checkpoint"))?
        .epoch;
    let path = work.join("checkpoint").join(format!("model-{best}.mpk"));
    let inner = PredictorTraining::<B::InnerBackend> {
        classifier: LowRankClassifierConfig::new(train.inputs_width, rank, train.outputs).init(device),
        negative_weight,
    };
    let inner = inner
        .load_file(&path, &Recorder::new(), device)
        .map_err(|e| TrainError::recording(&path, format!("cannot load the best checkpoint: {e}")))?;
    Ok((inner.classifier, epochs, best))
}

/// Trains, calibrates and writes the predictor folder; returns the report.
pub fn fit<B: AutodiffBackend>(options: &FitOptions, device: &B::Device) -> Result<FitReport, TrainError> {
    let start = std::time::Instant::now();
    let manifest = RecordingManifest::load(&options.recording)?;
    let hash = dejavu_model::content_hash(&options.model)?;
    if hash != manifest.plan.model_hash {
        return Err(TrainError::recording(
            options.recording.join(crate::recording::MANIFEST_FILE),
            format!(
                "the recording was made from the model {} ({}), not from {} ({hash}): predictors must be trained on their own model's activations",
                manifest.plan.model,
                manifest.plan.model_hash,
                options.model.display()
            ),
        ));
    }
    if manifest.valid_rows == 0 {
        return Err(TrainError::recording(&options.recording, "the recording has no validation rows (record with --valid-rows > 0)"));
    }
    if options.mlp_ranks.is_empty() || options.attention_ranks.is_empty() || options.mlp_ranks.contains(&0) || options.attention_ranks.contains(&0) {
        return Err(TrainError::Other("ranks must be positive and at least one per predictor kind".into()));
    }
    let dims = manifest.plan.dims;
    let work_root = options.out.join("training");
    let mut trained: Vec<TrainedPredictor> = Vec::new();

    for pair in &manifest.pairs {
        if options.layers.as_ref().is_some_and(|l| !l.contains(&pair.layer)) {
            continue;
        }
        let kind = PredictorKind::of(pair);
        let ranks = match kind {
            PredictorKind::Mlp => &options.mlp_ranks,
            PredictorKind::Attention => &options.attention_ranks,
        };
        let mut data: Option<(Arc<PairRows>, Arc<PairRows>)> = None;
        for &rank in ranks {
            let work = work_root.join(format!("{}-{:03}-r{rank}", kind.name(), pair.layer));
            let result_path = work.join("result.json");
            if options.resume && result_path.is_file() {
                let done: TrainedPredictor = read_json(&result_path)?;
                tracing::info!("{} layer {} rank {rank}: already trained", kind.name(), pair.layer);
                trained.push(done);
                continue;
            }
            let (train, valid) = match &data {
                Some(d) => d.clone(),
                None => {
                    let train = Arc::new(load_pair(&options.recording, &manifest, Split::Train, pair, options.head_fraction)?);
                    let valid = Arc::new(load_pair(&options.recording, &manifest, Split::Valid, pair, options.head_fraction)?);
                    data = Some((train.clone(), valid.clone()));
                    (train, valid)
                }
            };
            let t0 = std::time::Instant::now();
            let offset = match kind {
                PredictorKind::Mlp => 0.005,
                PredictorKind::Attention => 0.0,
            };
            let negative_weight = (train.positive_rate() + offset).min(1.0);
            let label = format!("{} layer {:>2} rank {rank}", kind.name(), pair.layer);
            let (classifier, epochs, best_epoch) = train_one::<B>(options, &work, label, kind, rank, negative_weight, &train, &valid, device)?;
            let logits = all_logits(&classifier, &valid, device);
            let labels: Vec<bool> = (0..valid.rows).flat_map(|r| (0..valid.outputs).map(move |j| (r, j))).map(|(r, j)| valid.label(r, j)).collect();
            let target = match kind {
                PredictorKind::Mlp => options.mlp_target_recall,
                PredictorKind::Attention => options.attention_target_recall,
            };
            let calibration = calibrate(&logits, &labels, valid.outputs, target)
                .ok_or_else(|| TrainError::recording(&options.recording, format!("{} has no positive label in the validation rows", pair.label)))?;
            let result = TrainedPredictor {
                kind,
                layer: pair.layer,
                rank,
                input: pair.input.clone(),
                label: pair.label.clone(),
                train_rows: train.rows,
                valid_rows: valid.rows,
                negative_weight,
                epochs,
                best_epoch,
                calibration,
                seconds: t0.elapsed().as_secs_f64(),
            };
            // The chosen weights beside the result, so a resumed run need not retrain.
            let weights = work.join("best");
            PredictorTraining { classifier, negative_weight }
                .save_file(&weights, &Recorder::new())
                .map_err(|e| TrainError::recording(&weights, e.to_string()))?;
            write_json(&result_path, &result)?;
            tracing::info!(
                "{} layer {} rank {rank}: recall@thr {:.4} density {:.4} (true {:.4}), K {} recall@K {:.4}",
                kind.name(),
                pair.layer,
                result.calibration.recall_at_threshold,
                result.calibration.density_at_threshold,
                result.calibration.true_density,
                result.calibration.k,
                result.calibration.recall_at_k
            );
            trained.push(result);
        }
    }

    let chosen = choose_ranks(&trained);
    let mut layers: Vec<LayerEntry> = (0..dims.num_layers).map(|layer| LayerEntry { layer, mlp: None, attention: None }).collect();
    for &(kind, layer, rank) in &chosen {
        let t = trained.iter().find(|t| t.kind == kind && t.layer == layer && t.rank == rank).expect("chosen from trained");
        let c = &t.calibration;
        let entry = Some(OutputEntry {
            rank,
            k: Some(c.k),
            threshold: Some(c.threshold),
            recall: Some(c.recall_at_k),
            density: Some(c.density_at_k),
            threshold_recall: Some(c.recall_at_threshold),
            threshold_density: Some(c.density_at_threshold),
            true_density: Some(c.true_density),
        });
        match kind {
            PredictorKind::Mlp => layers[layer].mlp = entry,
            PredictorKind::Attention => layers[layer].attention = entry,
        }
    }
    let predictor_manifest = Manifest {
        format: 1,
        model_hash: manifest.plan.model_hash.clone(),
        hidden_size: dims.hidden_size,
        ffn_dim: dims.ffn_dim,
        num_heads: dims.num_heads,
        num_layers: dims.num_layers,
        lookahead: manifest.plan.lookahead,
        layers,
    };
    let mut set = PredictorSet::<B::InnerBackend>::init(predictor_manifest, device)?;
    for &(kind, layer, rank) in &chosen {
        let weights = work_root.join(format!("{}-{:03}-r{rank}", kind.name(), layer)).join("best");
        let t = trained.iter().find(|t| t.kind == kind && t.layer == layer && t.rank == rank).expect("chosen");
        let outputs = match kind {
            PredictorKind::Mlp => dims.ffn_dim,
            PredictorKind::Attention => dims.num_heads,
        };
        let module = PredictorTraining::<B::InnerBackend> {
            classifier: LowRankClassifierConfig::new(dims.hidden_size, rank, outputs).init(device),
            negative_weight: t.negative_weight,
        }
        .load_file(&weights, &Recorder::new(), device)
        .map_err(|e| TrainError::recording(&weights, format!("cannot load trained weights: {e}")))?;
        match kind {
            PredictorKind::Mlp => set.modules.mlp[layer] = Some(module.classifier),
            PredictorKind::Attention => set.modules.attention[layer] = Some(module.classifier),
        }
    }
    set.save(&options.out)?;
    let report = FitReport {
        recording: options.recording.display().to_string(),
        model_hash: manifest.plan.model_hash.clone(),
        lookahead: manifest.plan.lookahead,
        head_fraction: options.head_fraction,
        trained,
        chosen,
        seconds: start.elapsed().as_secs_f64(),
    };
    write_json(&options.out.join(REPORT_FILE), &report)?;
    Ok(report)
}

/// Per layer and kind, the smallest rank whose threshold density is within 5% of the
/// lowest density any trained rank reached at the target recall: the cheapest predictor
/// that selects about as few outputs as the best one.
pub fn choose_ranks(trained: &[TrainedPredictor]) -> Vec<(PredictorKind, usize, usize)> {
    let mut keys: Vec<(PredictorKind, usize)> = trained.iter().map(|t| (t.kind, t.layer)).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|(kind, layer)| {
            let mut options: Vec<&TrainedPredictor> = trained.iter().filter(|t| t.kind == kind && t.layer == layer).collect();
            options.sort_by_key(|t| t.rank);
            let best = options.iter().map(|t| t.calibration.density_at_threshold).fold(f64::INFINITY, f64::min);
            let pick = options.iter().find(|t| t.calibration.density_at_threshold <= best * 1.05 + 1e-12).expect("non-empty");
            (kind, layer, pick.rank)
        })
        .collect()
}
