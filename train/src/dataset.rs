//! One predictor's training data, read from a recording: the input rows (F16 residuals)
//! and the packed labels, read into memory, then held on the training device and batched
//! there by row index.

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

/// The rows of one split for every layer of a run, held on the device for the whole fit,
/// so that a step sends the device only its row indices: the inputs as `[layers, rows,
/// hidden]` floats and the labels packed 32 to an int, `[layers, rows, words]`, unpacked per
/// batch. (Built on the host, a batch of 11 layers × 1024 rows converted and copied ~17 MB a
/// step; on the H100 a step took ~23 ms whatever the predictor's width, i.e. host-bound.)
#[derive(Debug, Clone)]
pub struct DeviceRows<B: Backend> {
    pub inputs: Tensor<B, 3>,
    pub labels: Tensor<B, 3, Int>,
    pub rows: usize,
    pub outputs: usize,
}

/// Label bits per packed int on the device (bit `j % 32` of word `j / 32`).
const WORD_BITS: usize = 32;

impl<B: Backend> DeviceRows<B> {
    /// Copies the rows of `layers` (all recorded for the same tokens) to `device`, one
    /// layer at a time so the host holds at most one layer's floats.
    pub fn upload(layers: &[Arc<PairRows>], device: &B::Device) -> Self {
        use half::slice::HalfFloatSliceExt;
        let first = &layers[0];
        let (rows, d, n) = (first.rows, first.inputs_width, first.outputs);
        let (bytes, words) = (packed_len(n), n.div_ceil(WORD_BITS));
        let mut inputs = Vec::with_capacity(layers.len());
        let mut labels = Vec::with_capacity(layers.len());
        for r in layers {
            let mut x = vec![0f32; rows * d];
            r.inputs.convert_to_f32_slice(&mut x);
            inputs.push(Tensor::<B, 2>::from_data(TensorData::new(x, [rows, d]), device).unsqueeze::<3>());
            // Bytes 4k..4k+4 of a row, little-endian, make word k: byte b's bit i is label
            // 8b + i, so word k's bit i is label 32k + i, as the batch unpacks it.
            let mut packed = Vec::with_capacity(rows * words);
            for row in r.labels.chunks_exact(bytes) {
                packed.extend((0..words).map(|k| {
                    let mut word = [0u8; 4];
                    let end = (4 * k + 4).min(bytes);
                    word[..end - 4 * k].copy_from_slice(&row[4 * k..end]);
                    i32::from_le_bytes(word)
                }));
            }
            labels.push(Tensor::<B, 2, Int>::from_data(TensorData::new(packed, [rows, words]), device).unsqueeze::<3>());
        }
        Self { inputs: Tensor::cat(inputs, 0), labels: Tensor::cat(labels, 0), rows, outputs: n }
    }

    pub fn layers(&self) -> usize {
        self.inputs.dims()[0]
    }

    /// The batch of the given rows (indices into `0..rows`).
    pub fn gather(&self, rows: Tensor<B, 1, Int>) -> RowBatch<B> {
        let n = self.outputs;
        let packed = self.labels.clone().select(1, rows.clone());
        let [l, b, words] = packed.dims();
        let device = packed.device();
        let shifts = Tensor::<B, 1, Int>::arange(0..WORD_BITS as i64, &device).reshape([1, 1, 1, WORD_BITS]).repeat(&[l, b, words, 1]);
        // An arithmetic shift of a negative word still leaves bit `s` lowest.
        let bits = packed.reshape([l, b, words, 1]).repeat_dim(3, WORD_BITS).bitwise_right_shift(shifts).bitwise_and_scalar(1.elem());
        let targets = bits.reshape([l, b, words * WORD_BITS]).slice([0..l, 0..b, 0..n]).float();
        RowBatch { inputs: self.inputs.clone().select(1, rows), targets }
    }

    /// Rows `range` of layer `layer`'s inputs, `[range.len(), hidden]`.
    pub fn layer_inputs(&self, layer: usize, range: std::ops::Range<usize>) -> Tensor<B, 2> {
        let [_, _, d] = self.inputs.dims();
        let len = range.len();
        self.inputs.clone().slice([layer..layer + 1, range, 0..d]).reshape([len, d])
    }
}

impl<B: burn::tensor::backend::AutodiffBackend> DeviceRows<B> {
    /// The same device buffers seen from the autodiff backend (no copy, no gradient).
    pub fn from_inner(rows: DeviceRows<B::InnerBackend>) -> Self {
        Self { inputs: Tensor::from_inner(rows.inputs), labels: Tensor::from_inner(rows.labels), rows: rows.rows, outputs: rows.outputs }
    }
}

impl<B: Backend> Batcher<B, usize, RowBatch<B>> for DeviceRows<B> {
    fn batch(&self, items: Vec<usize>, device: &B::Device) -> RowBatch<B> {
        // The indices go where the rows are; the batch then to where it is asked for (the
        // same device in `fit`, where moving is free).
        let index: Vec<i32> = items.iter().map(|&i| i as i32).collect();
        let batch = self.gather(Tensor::from_data(TensorData::new(index, [items.len()]), &self.inputs.device()));
        RowBatch { inputs: batch.inputs.to_device(device), targets: batch.targets.to_device(device) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    /// Rows with pseudo-random inputs and labels, `outputs` labels a row.
    fn rows(seed: u64, rows: usize, width: usize, outputs: usize) -> Arc<PairRows> {
        let mut state = seed;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let inputs = (0..rows * width).map(|_| f16::from_f32(next() as f32 / u32::MAX as f32 - 0.25)).collect();
        let mut labels = Vec::new();
        for _ in 0..rows {
            let row: Vec<bool> = (0..outputs).map(|_| next() % 3 == 0).collect();
            pack_row(&row, &mut labels);
        }
        Arc::new(PairRows { rows, inputs_width: width, outputs, inputs, labels })
    }

    /// A device batch holds exactly the host rows asked for, every label bit in place —
    /// widths that fill whole 32-bit words, part of one, and fewer than a byte.
    #[test]
    fn device_batches_equal_the_host_rows() {
        let device = Default::default();
        for outputs in [64, 70, 8, 5, 1024] {
            let layers: Vec<_> = (0..3).map(|l| rows(17 * outputs as u64 + l, 40, 6, outputs)).collect();
            let on_device = DeviceRows::<Flex>::upload(&layers, &device);
            let items = vec![39, 0, 7, 7, 21];
            let check = |batch: RowBatch<Flex>| {
                let x = batch.inputs.into_data().convert::<f32>().into_vec::<f32>().unwrap();
                let y = batch.targets.into_data().convert::<f32>().into_vec::<f32>().unwrap();
                assert_eq!(y.len(), 3 * items.len() * outputs);
                for (l, layer) in layers.iter().enumerate() {
                    for (b, &row) in items.iter().enumerate() {
                        for k in 0..6 {
                            assert_eq!(x[(l * items.len() + b) * 6 + k], layer.inputs[row * 6 + k].to_f32());
                        }
                        for j in 0..outputs {
                            let want = if layer.label(row, j) { 1.0 } else { 0.0 };
                            assert_eq!(y[(l * items.len() + b) * outputs + j], want, "outputs {outputs} layer {l} row {row} label {j}");
                        }
                    }
                }
            };
            check(Batcher::<Flex, usize, RowBatch<Flex>>::batch(&on_device, items.clone(), &device));
            let autodiff = DeviceRows::<Autodiff<Flex>>::from_inner(on_device.clone());
            let batch = Batcher::<Autodiff<Flex>, usize, RowBatch<Autodiff<Flex>>>::batch(&autodiff, items.clone(), &device);
            check(RowBatch { inputs: batch.inputs.inner(), targets: batch.targets.inner() });
            let slice = on_device.layer_inputs(2, 5..9).into_data().convert::<f32>().into_vec::<f32>().unwrap();
            assert_eq!(slice, layers[2].inputs[5 * 6..9 * 6].iter().map(|v| v.to_f32()).collect::<Vec<_>>());
        }
    }
}
