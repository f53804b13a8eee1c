//! What a predictor's training step reports, and the Learner metrics computed from it.
//!
//! A step reduces its batch on the device to five numbers (loss, true positives, predicted
//! positives, positives, elements), so syncing an iteration copies 6 floats, not the
//! `[batch, outputs]` probabilities a `MultiLabelClassificationOutput` would. Each metric
//! weights its per-batch value by its own denominator, so the epoch's mean is the exact
//! micro-averaged value (Σ TP / Σ positives for recall), as the reference reports it.

use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::Transaction;
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{Adaptor, ItemLazy, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes, NumericEntry, SerializedEntry};

/// A step's output, still on the device.
pub struct PredictorOutput<B: Backend> {
    /// `[1]`.
    pub loss: Tensor<B, 1>,
    /// `[3]`: true positives, predicted positives, positives.
    pub counts: Tensor<B, 1>,
    pub rows: usize,
    pub elements: usize,
}

/// A step's output on the host.
#[derive(Debug, Clone, Default)]
pub struct BatchCounts {
    pub loss: f64,
    pub rows: usize,
    pub true_positives: f64,
    pub predicted: f64,
    pub positives: f64,
    pub elements: f64,
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
        BatchCounts { loss, rows: self.rows, true_positives: c[0], predicted: c[1], positives: c[2], elements: self.elements as f64 }
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

    /// The metric's name in Burn's logs and summary.
    pub fn name(self) -> &'static str {
        match self {
            Quantity::Loss => "Loss",
            Quantity::Recall => "Recall",
            Quantity::Precision => "Precision",
            Quantity::PredictedDensity => "Predicted density",
            Quantity::TrueDensity => "True density",
        }
    }

    /// (value, weight) of a batch: the weight is the value's denominator.
    fn of(self, c: &BatchCounts) -> (f64, f64) {
        let ratio = |num: f64, den: f64| if den > 0.0 { (num / den, den) } else { (0.0, 0.0) };
        match self {
            Quantity::Loss => (c.loss, c.rows as f64),
            Quantity::Recall => ratio(c.true_positives, c.positives),
            Quantity::Precision => ratio(c.true_positives, c.predicted),
            Quantity::PredictedDensity => ratio(c.predicted, c.elements),
            Quantity::TrueDensity => ratio(c.positives, c.elements),
        }
    }
}

/// One of [`Quantity`] as a Burn metric (threshold: logit > 0, i.e. sigmoid > 0.5).
#[derive(Clone)]
pub struct CountMetric {
    quantity: Quantity,
    name: MetricName,
    state: NumericMetricState,
}

impl CountMetric {
    pub fn new(quantity: Quantity) -> Self {
        Self { quantity, name: Arc::new(quantity.name().to_string()), state: NumericMetricState::new() }
    }
}

impl Metric for CountMetric {
    type Input = BatchCounts;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn update(&mut self, item: &BatchCounts, _metadata: &MetricMetadata) -> SerializedEntry {
        let (value, weight) = self.quantity.of(item);
        // NumericMetricState weights by an integer count; the denominators are counts
        // (rounded only for the loss's row count, which is exact).
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
