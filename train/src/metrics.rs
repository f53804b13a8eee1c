//! What a training step reports, and the Learner metrics computed from it.
//!
//! One run trains a predictor for every layer at once (see [`crate::fit`]). A step reduces
//! its batch on the device to a few numbers per layer (true positives, predicted
//! positives, positives) plus the loss, so syncing an iteration copies `3 · layers + 1`
//! floats, not `[layers, batch, outputs]` probabilities. Each metric weights its per-batch
//! value by its own denominator, so an epoch's mean is the exact micro-averaged value
//! (Σ TP / Σ positives for recall), as the reference reports it.

use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::Transaction;
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{Adaptor, ItemLazy, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes, NumericEntry, SerializedEntry};

/// A step's output, still on the device.
pub struct PredictorOutput<B: Backend> {
    /// `[1]`.
    pub loss: Tensor<B, 1>,
    /// `[layers, 3]`: true positives, predicted positives, positives.
    pub counts: Tensor<B, 2>,
    pub rows: usize,
    /// Elements per layer (rows × outputs).
    pub elements: usize,
}

/// A step's output on the host.
#[derive(Debug, Clone, Default)]
pub struct BatchCounts {
    pub loss: f64,
    pub rows: usize,
    pub elements: f64,
    /// Per layer of the run: [true positives, predicted, positives].
    pub layers: Vec<[f64; 3]>,
}

impl<B: Backend> ItemLazy for PredictorOutput<B> {
    type ItemSync = BatchCounts;

    fn sync(self) -> BatchCounts {
        let [loss, counts]: [burn::tensor::TensorData; 2] = Transaction::default()
            .register(self.loss)
            .register(self.counts)
            .execute()
            .try_into()
            .expect("two tensors registered");
        let loss = loss.convert::<f64>().into_vec::<f64>().expect("f64")[0];
        let c = counts.convert::<f64>().into_vec::<f64>().expect("f64");
        BatchCounts { loss, rows: self.rows, elements: self.elements as f64, layers: c.chunks(3).map(|x| [x[0], x[1], x[2]]).collect() }
    }
}

impl Adaptor<BatchCounts> for BatchCounts {
    fn adapt(&self) -> BatchCounts {
        self.clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantity {
    Loss,
    Recall,
    Precision,
    PredictedDensity,
    TrueDensity,
}

impl Quantity {
    pub const ALL: [Quantity; 5] = [Quantity::Loss, Quantity::Recall, Quantity::Precision, Quantity::PredictedDensity, Quantity::TrueDensity];
    /// The quantities also reported per layer (on validation rows).
    pub const PER_LAYER: [Quantity; 4] = [Quantity::Recall, Quantity::Precision, Quantity::PredictedDensity, Quantity::TrueDensity];

    /// The metric's name in Burn's logs and summary, over all layers of the run.
    pub fn name(self) -> &'static str {
        match self {
            Quantity::Loss => "Loss",
            Quantity::Recall => "Recall",
            Quantity::Precision => "Precision",
            Quantity::PredictedDensity => "Predicted density",
            Quantity::TrueDensity => "True density",
        }
    }

    /// The name of this quantity for the run's `index`-th layer (model layer `layer`).
    pub fn layer_name(self, layer: usize) -> String {
        format!("{} L{layer}", self.name())
    }

    /// (value, weight) over `layers` (indices into the run's layers); the weight is the
    /// value's denominator.
    fn of(self, c: &BatchCounts, layers: &[usize]) -> (f64, f64) {
        let sum = |k: usize| layers.iter().map(|&i| c.layers[i][k]).sum::<f64>();
        let elements = c.elements * layers.len() as f64;
        let ratio = |num: f64, den: f64| if den > 0.0 { (num / den, den) } else { (0.0, 0.0) };
        match self {
            Quantity::Loss => (c.loss, c.rows as f64),
            Quantity::Recall => ratio(sum(0), sum(2)),
            Quantity::Precision => ratio(sum(0), sum(1)),
            Quantity::PredictedDensity => ratio(sum(1), elements),
            Quantity::TrueDensity => ratio(sum(2), elements),
        }
    }
}

/// One of [`Quantity`] as a Burn metric (threshold: logit > 0, i.e. sigmoid > 0.5), over
/// all layers of the run or over one.
#[derive(Clone)]
pub struct CountMetric {
    quantity: Quantity,
    /// `None`: all layers; `Some(i)`: the run's `i`-th layer.
    layer: Option<usize>,
    name: MetricName,
    state: NumericMetricState,
}

impl CountMetric {
    pub fn new(quantity: Quantity) -> Self {
        Self { quantity, layer: None, name: Arc::new(quantity.name().to_string()), state: NumericMetricState::new() }
    }

    /// The quantity for the run's `index`-th layer, which is model layer `layer`.
    pub fn for_layer(quantity: Quantity, index: usize, layer: usize) -> Self {
        Self { quantity, layer: Some(index), name: Arc::new(quantity.layer_name(layer)), state: NumericMetricState::new() }
    }
}

impl Metric for CountMetric {
    type Input = BatchCounts;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn update(&mut self, item: &BatchCounts, _metadata: &MetricMetadata) -> SerializedEntry {
        let all: Vec<usize>;
        let layers: &[usize] = match &self.layer {
            Some(i) => std::slice::from_ref(i),
            None => {
                all = (0..item.layers.len()).collect();
                &all
            }
        };
        let (value, weight) = self.quantity.of(item, layers);
        // NumericMetricState weights by an integer count; the denominators are counts.
        self.state.update(value, weight.round() as usize, FormatOptions::new(self.name()).precision(4))
    }

    fn clear(&mut self) {
        self.state.reset()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes { unit: None, higher_is_better: !matches!(self.quantity, Quantity::Loss) }.into()
    }
}

impl Numeric for CountMetric {
    fn value(&self) -> NumericEntry {
        self.state.current_value()
    }

    fn running_value(&self) -> NumericEntry {
        self.state.running_value()
    }
}
