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
use burn::module::Param;
use burn::tensor::{Distribution, TensorData};
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::metric::store::{Aggregate, Direction, Split as MetricSplit};
use burn::train::{InferenceStep, Learner, LearnerSummary, MetricEarlyStoppingStrategy, StoppingCondition, SupervisedTraining, TrainOutput, TrainStep};
use dejavu_predictor::{calibrate, Calibration, LayerEntry, LowRankClassifier, LowRankClassifierConfig, Manifest, OutputEntry, PredictorSet};
use serde::{Deserialize, Serialize};

use crate::dataset::{load_pair, DeviceRows, PairRows, PredictorKind, RowBatch, RowIndices};
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
    /// Train only these kinds of predictor (both when empty).
    pub kinds: Vec<PredictorKind>,
    pub seed: u64,
    pub workers: usize,
    /// Continue an interrupted run from its checkpoints instead of starting over.
    pub resume: bool,
    pub progress: bool,
}

impl FitOptions {
    fn ranks(&self, kind: PredictorKind) -> &[usize] {
        match kind {
            PredictorKind::Mlp => &self.mlp_ranks,
            PredictorKind::Attention => &self.attention_ranks,
        }
    }

    fn learning_rate(&self, kind: PredictorKind) -> f64 {
        match kind {
            PredictorKind::Mlp => self.mlp_learning_rate,
            PredictorKind::Attention => self.attention_learning_rate,
        }
    }

    fn target_recall(&self, kind: PredictorKind) -> f64 {
        match kind {
            PredictorKind::Mlp => self.mlp_target_recall,
            PredictorKind::Attention => self.attention_target_recall,
        }
    }
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
    /// Wall time of the run that trained it (all layers of its kind and rank together).
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

/// The predictors of several layers (one kind, one rank) trained together: layer `i`'s
/// classifier is `down[i]` (`[hidden, rank]`) then `up[i]` (`[rank, outputs]`), the
/// layout of Burn's `Linear` weights, so a batched matmul runs all layers in one launch.
#[derive(Module, Debug)]
pub struct LayerPredictors<B: Backend> {
    pub down: Param<Tensor<B, 3>>,
    pub up: Param<Tensor<B, 3>>,
    /// Per layer, the weight of a negative element in the loss (`w`).
    pub negative_weights: Vec<f64>,
}

impl<B: Backend> LayerPredictors<B> {
    /// Burn's `Linear` initialisation (uniform in ±1/√fan_in) for each layer.
    pub fn init(layers: usize, hidden: usize, rank: usize, outputs: usize, negative_weights: Vec<f64>, device: &B::Device) -> Self {
        let uniform = |fan_in: usize| Distribution::Uniform(-1.0 / (fan_in as f64).sqrt(), 1.0 / (fan_in as f64).sqrt());
        Self {
            down: Param::from_tensor(Tensor::random([layers, hidden, rank], uniform(hidden), device)),
            up: Param::from_tensor(Tensor::random([layers, rank, outputs], uniform(rank), device)),
            negative_weights,
        }
    }

    /// Logits `[layers, rows, outputs]` for inputs `[layers, rows, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        x.matmul(self.down.val()).matmul(self.up.val())
    }

    /// Layer `i` of the run as a standalone classifier.
    pub fn classifier(&self, i: usize) -> LowRankClassifier<B> {
        let [_, hidden, rank] = self.down.val().dims();
        let [_, _, outputs] = self.up.val().dims();
        let mut c = LowRankClassifierConfig::new(hidden, rank, outputs).init::<B>(&self.down.val().device());
        c.down.weight = Param::from_tensor(self.down.val().slice([i..i + 1, 0..hidden, 0..rank]).reshape([hidden, rank]));
        c.up.weight = Param::from_tensor(self.up.val().slice([i..i + 1, 0..rank, 0..outputs]).reshape([rank, outputs]));
        c
    }

    fn forward_step(&self, batch: RowBatch<B>) -> (Tensor<B, 1>, PredictorOutput<B>) {
        let z = self.forward(batch.inputs);
        let y = batch.targets;
        let [layers, rows, outputs] = z.dims();
        let device = z.device();
        let w = Tensor::<B, 1>::from_data(TensorData::new(self.negative_weights.iter().map(|&v| v as f32).collect::<Vec<_>>(), [layers]), &device)
            .reshape([layers, 1, 1]);
        let sp = softplus(z.clone());
        // softplus(−z) = softplus(z) − z. The loss is summed over layers (each layer's
        // mean), so every layer learns as it would alone.
        let per_element = y.clone() * (sp.clone() - z.clone()) + (y.clone().neg() + 1.0) * sp * w;
        let loss = per_element.mean().mul_scalar(layers as f64);
        let predicted = z.greater_elem(0.0).float();
        let per_layer = |t: Tensor<B, 3>| t.sum_dim(2).sum_dim(1).reshape([layers, 1]);
        let counts = Tensor::cat(vec![per_layer(predicted.clone() * y.clone()), per_layer(predicted), per_layer(y)], 1);
        let output = PredictorOutput { loss: loss.clone().detach(), counts, rows, elements: rows * outputs };
        (loss, output)
    }
}

/// `softplus(z) = max(z, 0) + ln(1 + e^{−|z|})`, without overflow.
fn softplus<B: Backend, const D: usize>(z: Tensor<B, D>) -> Tensor<B, D> {
    z.clone().clamp_min(0.0) + z.abs().neg().exp().log1p()
}

impl<B: AutodiffBackend> TrainStep for LayerPredictors<B> {
    type Input = RowBatch<B>;
    type Output = PredictorOutput<B>;

    fn step(&self, batch: RowBatch<B>) -> TrainOutput<PredictorOutput<B>> {
        let (loss, output) = self.forward_step(batch);
        TrainOutput::new(self, loss.backward(), output)
    }
}

impl<B: Backend> InferenceStep for LayerPredictors<B> {
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

/// Reads the per-epoch metrics Burn logged under `dir` for model layer `layer`.
fn epoch_metrics(summary: &LearnerSummary, layer: usize) -> Vec<EpochMetrics> {
    let value = |list: &[burn::train::MetricSummary], name: &str, epoch: usize| {
        list.iter().find(|m| m.name == name).and_then(|m| m.entries.iter().find(|e| e.step == epoch)).map(|e| e.value)
    };
    let valid = &summary.metrics.valid;
    (1..=summary.epochs)
        .map(|epoch| EpochMetrics {
            epoch,
            train_loss: value(&summary.metrics.train, "Loss", epoch),
            valid_loss: value(valid, "Loss", epoch),
            recall: value(valid, &Quantity::Recall.layer_name(layer), epoch),
            precision: value(valid, &Quantity::Precision.layer_name(layer), epoch),
            predicted_density: value(valid, &Quantity::PredictedDensity.layer_name(layer), epoch),
            true_density: value(valid, &Quantity::TrueDensity.layer_name(layer), epoch),
        })
        .filter(|m| m.recall.is_some())
        .collect()
}

/// Logits of `model` (every layer of a run) on every row of `rows`, per layer
/// `[rows, outputs]` row-major, on the host. Batches of `batch` rows, the shapes validation
/// ran, so a GPU's matmul autotuner has seen them already.
fn all_logits<B: Backend>(model: &LayerPredictors<B>, rows: &DeviceRows<B>, batch: usize) -> Vec<Vec<f32>> {
    let layers = rows.layers();
    let [_, _, d] = rows.inputs.dims();
    let mut out = vec![Vec::with_capacity(rows.rows * rows.outputs); layers];
    for start in (0..rows.rows).step_by(batch) {
        let end = (start + batch).min(rows.rows);
        let logits = model.forward(rows.inputs.clone().slice([0..layers, start..end, 0..d]));
        let host = logits.into_data().convert::<f32>().into_vec::<f32>().expect("f32");
        for (layer, chunk) in out.iter_mut().zip(host.chunks_exact((end - start) * rows.outputs)) {
            layer.extend_from_slice(chunk);
        }
    }
    out
}

/// One kind's rows, every layer it trains, on the device; on the host only what
/// calibration reads (the validation labels) and each layer's loss weight.
#[derive(Clone)]
struct KindRows<B: Backend> {
    /// Per layer, the weight of a negative element in the loss (`w`).
    negative_weights: Vec<f64>,
    valid: Vec<Arc<PairRows>>,
    train_rows: DeviceRows<B>,
    valid_rows: DeviceRows<B>,
}

/// One run: the predictors of the layers of `pairs` for one kind and rank, with their rows
/// on the device.
struct Run<'a, B: Backend> {
    kind: PredictorKind,
    rank: usize,
    pairs: Vec<&'a crate::recording::Pair>,
    train: DeviceRows<B>,
    valid: DeviceRows<B>,
}

/// One layer of a trained run: the classifier of its best epoch (highest validation recall
/// of that layer), its epoch metrics, that epoch, and its logits on the validation rows
/// (`[rows, outputs]`, on the host) for calibration.
struct LayerResult<B: Backend> {
    classifier: LowRankClassifier<B>,
    epochs: Vec<EpochMetrics>,
    best_epoch: usize,
    logits: Vec<f32>,
}

/// Trains one run with the Learner and returns its [`LayerResult`]s, in the run's layer order.
fn train_run<B: AutodiffBackend>(options: &FitOptions, work: &Path, run: &Run<B::InnerBackend>, negative_weights: Vec<f64>, device: &B::Device) -> Result<Vec<LayerResult<B::InnerBackend>>, TrainError> {
    let resume_epoch = if options.resume { last_checkpoint(work) } else { None };
    if resume_epoch.is_none() && work.exists() {
        std::fs::remove_dir_all(work).map_err(|source| TrainError::Io { path: work.to_path_buf(), source })?;
    }
    std::fs::create_dir_all(work).map_err(|source| TrainError::Io { path: work.to_path_buf(), source })?;
    B::seed(device, options.seed);
    let [_, _, hidden] = run.train.inputs.dims();
    let outputs = run.train.outputs;
    let model = LayerPredictors::<B>::init(run.pairs.len(), hidden, run.rank, outputs, negative_weights.clone(), device);
    let rows = run.train.rows;
    let dl_train = DataLoaderBuilder::new(DeviceRows::<B>::from_inner(run.train.clone()))
        .batch_size(options.batch_size)
        .shuffle(options.seed)
        .num_workers(options.workers)
        .set_device(device.clone())
        // Whole batches only (at most batch − 1 rows unused): one batch shape, one set of
        // kernels to compile and autotune on a GPU.
        .build(RowIndices(((rows / options.batch_size).max(1) * options.batch_size).min(rows)));
    let dl_valid = DataLoaderBuilder::<B::InnerBackend, _, _>::new(run.valid.clone())
        .batch_size(options.batch_size)
        .num_workers(options.workers)
        .set_device(device.clone())
        .build(RowIndices(run.valid.rows));
    let recall = CountMetric::new(Quantity::Recall);
    let mut training = SupervisedTraining::new(work, dl_train, dl_valid)
        .with_file_checkpointer(Recorder::new())
        // Every epoch is kept: each layer takes its own best epoch afterwards.
        .with_checkpointing_strategy(KeepLastNCheckpoints::new(options.epochs.max(1)))
        .early_stopping(MetricEarlyStoppingStrategy::new(
            &recall,
            Aggregate::Mean,
            Direction::Highest,
            MetricSplit::Valid,
            StoppingCondition::NoImprovementSince { n_epochs: options.patience },
        ))
        .num_epochs(options.epochs)
        .renderer(BarRenderer::new(format!("{} rank {} ({} layers)", run.kind.name(), run.rank, run.pairs.len()), options.progress))
        .with_application_logger(None);
    for q in Quantity::ALL {
        training = training.metric_train_numeric(CountMetric::new(q)).metric_valid_numeric(CountMetric::new(q));
    }
    for (i, pair) in run.pairs.iter().enumerate() {
        for q in Quantity::PER_LAYER {
            training = training.metric_valid_numeric(CountMetric::for_layer(q, i, pair.layer));
        }
    }
    if let Some(epoch) = resume_epoch {
        if epoch < options.epochs {
            training = training.checkpoint(epoch);
        }
    }
    let lr = options.learning_rate(run.kind);
    let optimizer = AdamWConfig::new().with_weight_decay(options.weight_decay as f32).init();
    if resume_epoch.is_none_or(|e| e < options.epochs) {
        let t = std::time::Instant::now();
        let _ = training.launch(Learner::new(model, optimizer, lr));
        tracing::info!("{} rank {}: the Learner ran in {:.1} s", run.kind.name(), run.rank, t.elapsed().as_secs_f64());
    }

    let mut names: Vec<String> = Quantity::ALL.iter().map(|q| q.name().to_string()).collect();
    for pair in &run.pairs {
        for q in Quantity::PER_LAYER {
            names.push(q.layer_name(pair.layer));
        }
    }
    let summary = LearnerSummary::new(work, &names).map_err(|e| TrainError::recording(work, format!("cannot read the training logs: {e}")))?;
    let trained_at = std::time::Instant::now();
    // Per epoch kept by some layer: the model and its validation logits, every layer.
    type EpochModel<B> = (LayerPredictors<B>, Vec<Vec<f32>>);
    let mut loaded: std::collections::BTreeMap<usize, EpochModel<B::InnerBackend>> = Default::default();
    let mut out = Vec::new();
    for (i, pair) in run.pairs.iter().enumerate() {
        let epochs = epoch_metrics(&summary, pair.layer);
        // Of the epochs with a checkpoint on disk, the one with this layer's best
        // validation recall (the earliest on ties).
        let best = epochs
            .iter()
            .filter(|e| work.join("checkpoint").join(format!("model-{}.mpk", e.epoch)).is_file())
            .fold(None::<&EpochMetrics>, |best, e| match best {
                Some(b) if b.recall >= e.recall => Some(b),
                _ => Some(e),
            })
            .ok_or_else(|| TrainError::recording(work.join("checkpoint"), "training left no model checkpoint"))?
            .epoch;
        if let std::collections::btree_map::Entry::Vacant(slot) = loaded.entry(best) {
            let path = work.join("checkpoint").join(format!("model-{best}.mpk"));
            let skeleton = LayerPredictors::<B::InnerBackend>::init(run.pairs.len(), hidden, run.rank, outputs, negative_weights.clone(), device);
            let model = skeleton.load_file(&path, &Recorder::new(), device).map_err(|e| TrainError::recording(&path, format!("cannot load the checkpoint: {e}")))?;
            let logits = all_logits(&model, &run.valid, options.batch_size);
            slot.insert((model, logits));
        }
        let (model, logits) = loaded.get_mut(&best).expect("inserted above");
        out.push(LayerResult { classifier: model.classifier(i), epochs, best_epoch: best, logits: std::mem::take(&mut logits[i]) });
    }
    tracing::info!("{} rank {}: best epochs loaded and their validation logits computed in {:.1} s", run.kind.name(), run.rank, trained_at.elapsed().as_secs_f64());
    Ok(out)
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
    if options.batch_size == 0 || options.epochs == 0 {
        return Err(TrainError::Other("--batch-size and --epochs must be positive".into()));
    }
    let dims = manifest.plan.dims;
    let work_root = options.out.join("training");
    let mut trained: Vec<TrainedPredictor> = Vec::new();

    for kind in [PredictorKind::Mlp, PredictorKind::Attention] {
        if !options.kinds.is_empty() && !options.kinds.contains(&kind) {
            continue;
        }
        let pairs: Vec<&crate::recording::Pair> = manifest
            .pairs
            .iter()
            .filter(|p| PredictorKind::of(p) == kind && options.layers.as_ref().is_none_or(|l| l.contains(&p.layer)))
            .collect();
        if pairs.is_empty() {
            continue;
        }
        // Read once per kind, for every rank; the host's copy of the training rows is
        // dropped once they are on the device.
        let mut data: Option<KindRows<B::InnerBackend>> = None;
        for &rank in options.ranks(kind) {
            let work = work_root.join(format!("{}-r{rank}", kind.name()));
            let result_path = work.join("result.json");
            if options.resume && result_path.is_file() {
                let done: Vec<TrainedPredictor> = read_json(&result_path)?;
                tracing::info!("{} rank {rank}: already trained", kind.name());
                trained.extend(done);
                continue;
            }
            if data.is_none() {
                let load = |split| pairs.iter().map(|p| load_pair(&options.recording, &manifest, split, p, options.head_fraction).map(Arc::new)).collect::<Result<Vec<_>, _>>();
                let (train, valid) = (load(Split::Train)?, load(Split::Valid)?);
                let t = std::time::Instant::now();
                let (train_rows, valid_rows) = (DeviceRows::upload(&train, device), DeviceRows::upload(&valid, device));
                tracing::info!("{}: {} training and {} validation rows of {} layers on the device in {:.1} s", kind.name(), train_rows.rows, valid_rows.rows, train.len(), t.elapsed().as_secs_f64());
                let offset = match kind {
                    PredictorKind::Mlp => 0.005,
                    PredictorKind::Attention => 0.0,
                };
                let negative_weights = train.iter().map(|t| (t.positive_rate() + offset).min(1.0)).collect();
                data = Some(KindRows { negative_weights, valid, train_rows, valid_rows });
            }
            let KindRows { negative_weights, valid, train_rows, valid_rows } = data.clone().expect("loaded above");
            let t0 = std::time::Instant::now();
            let run = Run { kind, rank, pairs: pairs.clone(), train: train_rows, valid: valid_rows };
            let per_layer = train_run::<B>(options, &work, &run, negative_weights.clone(), device)?;
            let train_seconds = t0.elapsed().as_secs_f64();
            let target = options.target_recall(kind);
            let mut results = Vec::new();
            let calibrating = std::time::Instant::now();
            for (i, LayerResult { classifier, epochs, best_epoch, logits }) in per_layer.into_iter().enumerate() {
                let (pair, valid) = (run.pairs[i], &valid[i]);
                let labels: Vec<bool> = (0..valid.rows).flat_map(|r| (0..valid.outputs).map(move |j| (r, j))).map(|(r, j)| valid.label(r, j)).collect();
                let calibration = calibrate(&logits, &labels, valid.outputs, target)
                    .ok_or_else(|| TrainError::recording(&options.recording, format!("{} has no positive label in the validation rows", pair.label)))?;
                // The chosen weights beside the result, so a resumed run need not retrain.
                let weights = work.join(format!("best-{}", pair.layer));
                classifier.save_file(&weights, &Recorder::new()).map_err(|e| TrainError::recording(&weights, e.to_string()))?;
                let result = TrainedPredictor {
                    kind,
                    layer: pair.layer,
                    rank,
                    input: pair.input.clone(),
                    label: pair.label.clone(),
                    train_rows: run.train.rows,
                    valid_rows: valid.rows,
                    negative_weight: negative_weights[i],
                    epochs,
                    best_epoch,
                    calibration,
                    seconds: train_seconds,
                };
                let c = &result.calibration;
                tracing::info!(
                    "{} layer {} rank {rank}: recall {:.4} at density {:.4} by threshold (true density {:.4}); K {} recall {:.4}; best epoch {}",
                    kind.name(),
                    pair.layer,
                    c.recall_at_threshold,
                    c.density_at_threshold,
                    c.true_density,
                    c.k,
                    c.recall_at_k,
                    best_epoch
                );
                results.push(result);
            }
            tracing::info!("{} rank {rank}: trained in {train_seconds:.1} s, calibrated in {:.1} s", kind.name(), calibrating.elapsed().as_secs_f64());
            write_json(&result_path, &results)?;
            trained.extend(results);
        }
    }

    let chosen = choose_ranks(&trained);
    let mut layers: Vec<LayerEntry> = (0..dims.num_layers).map(|layer| LayerEntry { layer, mlp: None, attention: None }).collect();
    let mut set_modules: Vec<(PredictorKind, usize, LowRankClassifier<B::InnerBackend>)> = Vec::new();
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
        let outputs = kind.outputs(&dims);
        let weights = work_root.join(format!("{}-r{rank}", kind.name())).join(format!("best-{layer}"));
        let module = LowRankClassifierConfig::new(dims.hidden_size, rank, outputs)
            .init::<B::InnerBackend>(device)
            .load_file(&weights, &Recorder::new(), device)
            .map_err(|e| TrainError::recording(&weights, format!("cannot load trained weights: {e}")))?;
        set_modules.push((kind, layer, module));
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
    for (kind, layer, module) in set_modules {
        match kind {
            PredictorKind::Mlp => set.modules.mlp[layer] = Some(module),
            PredictorKind::Attention => set.modules.attention[layer] = Some(module),
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
