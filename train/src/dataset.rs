//! One predictor's training data, read from a recording: the input rows (F16 residuals)
//! and the packed labels, held in memory, batched by row index.

use std::path::Path;
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::prelude::*;
use burn::tensor::{ElementConversion, TensorData};
use half::f16;

use crate::bits::{count_ones, pack_row, packed_len};
use crate::error::TrainError;
use crate::recording::{Dims, Pair, RecordingManifest, Split};

/// Which predictor a [`Pair`] trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PredictorKind {
    Mlp,
    Attention,
}

impl PredictorKind {
    pub fn of(pair: &Pair) -> Self {
        if pair.predictor == "mlp" {
            PredictorKind::Mlp
        } else {
            PredictorKind::Attention
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PredictorKind::Mlp => "mlp",
            PredictorKind::Attention => "attention",
        }
    }

    /// Outputs a predictor of this kind scores: the ffn neurons or the heads.
    pub fn outputs(self, dims: &Dims) -> usize {
        match self {
            PredictorKind::Mlp => dims.ffn_dim,
            PredictorKind::Attention => dims.num_heads,
        }
    }
}

/// Rows of one split for one pair.
#[derive(Debug)]
pub struct PairRows {
    pub rows: usize,
    pub inputs_width: usize,
    pub outputs: usize,
    /// `rows × inputs_width`.
    pub inputs: Vec<f16>,
    /// `rows × packed_len(outputs)`.
    pub labels: Vec<u8>,
}

impl PairRows {
    pub fn positive_rate(&self) -> f64 {
        count_ones(&self.labels) as f64 / (self.rows * self.outputs).max(1) as f64
    }

    pub fn label(&self, row: usize, j: usize) -> bool {
        let w = packed_len(self.outputs);
        crate::bits::get(&self.labels[row * w..(row + 1) * w], j)
    }
}

/// Heads labelled positive per token: the top `fraction` of heads by output norm (at least
/// one), as the reference's `int(k · heads)` with k = 0.3.
pub fn top_heads(heads: usize, fraction: f64) -> usize {
    ((fraction * heads as f64).floor() as usize).clamp(1, heads)
}

/// Reads `pair` from every shard of `split`. Attention labels are made here from the head
/// norms: per row, the `top_heads(heads, head_fraction)` largest norms (ties to the lower
/// head index).
pub fn load_pair(dir: &Path, manifest: &RecordingManifest, split: Split, pair: &Pair, head_fraction: f64) -> Result<PairRows, TrainError> {
    let dims = manifest.plan.dims;
    let kind = PredictorKind::of(pair);
    let outputs = kind.outputs(&dims);
    let mut inputs = Vec::new();
    let mut labels = Vec::new();
    let mut rows = 0;
    let top = top_heads(dims.num_heads, head_fraction);
    let mut order: Vec<usize> = Vec::with_capacity(dims.num_heads);
    let mut chosen = vec![false; dims.num_heads];
    for shard in manifest.open_shards(dir, split)? {
        let x = shard.bytes(&pair.input)?;
        inputs.extend(x.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])));
        let y = shard.bytes(&pair.label)?;
        match kind {
            PredictorKind::Mlp => labels.extend_from_slice(y),
            PredictorKind::Attention => {
                for row in y.chunks_exact(dims.num_heads * 2) {
                    let norms: Vec<f32> = row.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
                    order.clear();
                    order.extend(0..dims.num_heads);
                    order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]).then(a.cmp(&b)));
                    chosen.iter_mut().for_each(|c| *c = false);
                    for &h in &order[..top] {
                        chosen[h] = true;
                    }
                    pack_row(&chosen, &mut labels);
                }
            }
        }
        rows += shard.meta.rows;
    }
    Ok(PairRows { rows, inputs_width: dims.hidden_size, outputs, inputs, labels })
}

/// Row indices `0..len` (the batcher looks the rows up).
pub struct RowIndices(pub usize);

impl Dataset<usize> for RowIndices {
    fn get(&self, index: usize) -> Option<usize> {
        (index < self.0).then_some(index)
    }

    fn len(&self) -> usize {
        self.0
    }
}

/// A batch for a run over several layers: the same token rows, each layer's input and
/// labels.
#[derive(Debug, Clone)]
pub struct RowBatch<B: Backend> {
    /// `[layers, batch, hidden]`.
    pub inputs: Tensor<B, 3>,
    /// `[layers, batch, outputs]`, 0.0 / 1.0.
    pub targets: Tensor<B, 3>,
}

/// Builds [`RowBatch`]es from the rows of several layers (all recorded for the same
/// tokens, so row `i` of each is the same token).
#[derive(Clone)]
pub struct RowBatcher {
    pub layers: Vec<Arc<PairRows>>,
}

impl<B: Backend> Batcher<B, usize, RowBatch<B>> for RowBatcher {
    fn batch(&self, items: Vec<usize>, device: &B::Device) -> RowBatch<B> {
        let first = &self.layers[0];
        let (d, n, w) = (first.inputs_width, first.outputs, packed_len(first.outputs));
        let (l, b) = (self.layers.len(), items.len());
        let mut x = Vec::with_capacity(l * b * d);
        let mut packed: Vec<i32> = Vec::with_capacity(l * b * w);
        for r in &self.layers {
            for &row in &items {
                x.extend(r.inputs[row * d..(row + 1) * d].iter().map(|v| v.to_f32()));
                packed.extend(r.labels[row * w..(row + 1) * w].iter().map(|&v| v as i32));
            }
        }
        // The labels travel packed (8 per byte) and are unpacked on the device: a batch of
        // MLP labels is 1/8 of the bytes (and host work) it would be as floats.
        let packed = Tensor::<B, 3, Int>::from_data(TensorData::new(packed, [l, b, w]), device);
        let shifts = Tensor::<B, 1, Int>::arange(0..8, device).reshape([1, 1, 1, 8]).repeat(&[l, b, w, 1]);
        let bits = packed.reshape([l, b, w, 1]).repeat_dim(3, 8).bitwise_right_shift(shifts).bitwise_and_scalar(1.elem());
        let targets = bits.reshape([l, b, w * 8]).slice([0..l, 0..b, 0..n]).float();
        RowBatch { inputs: Tensor::from_data(TensorData::new(x, [l, b, d]), device), targets }
    }
}
