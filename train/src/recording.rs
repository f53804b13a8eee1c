//! The recording folder: what `dejavu-train record` writes and `dejavu-train fit` reads.
//!
//! - `plan.json` — the settings, written first; a rerun with other settings is refused.
//! - `valid-NNNNN.safetensors`, `train-NNNNN.safetensors` — the shards. Each holds, for
//!   its rows (token positions) and every layer `l`:
//!   `layer.l.attention_input` `[rows, hidden]` F16 (residual entering the layer, before its
//!   LayerNorm), `layer.l.mlp_input` `[rows, hidden]` F16 (residual entering the MLP, before
//!   its LayerNorm), `layer.l.mlp_active` `[rows, ceil(ffn / 8)]` U8 (fc1 output > 0 after
//!   the ReLU, bit-packed as in [`crate::bits`]), `layer.l.head_norms` `[rows, heads]` F16
//!   (L2 norm of each head's attention output, before `out_proj`); and `document`, `position`
//!   `[rows]` U32 (where each row came from). A shard is written under a temporary name and
//!   renamed when complete; its `__metadata__` says where the next shard starts, which is
//!   what a resumed run continues from.
//! - `recording.json` — the [`RecordingManifest`], written last: the recording is
//!   complete when it exists.
//!
//! Validation rows come first in the text, from whole documents that no training row comes
//! from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::bits::packed_len;
use crate::error::TrainError;

pub const PLAN_FILE: &str = "plan.json";
pub const MANIFEST_FILE: &str = "recording.json";
pub const FORMAT: u32 = 1;
/// The shard `__metadata__` key holding [`ShardMeta`] as JSON (one key, so the header's
/// bytes do not depend on hash-map order).
const SHARD_META_KEY: &str = "dejavu";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Valid,
    Train,
}

impl Split {
    /// Index of the split in per-split arrays: validation 0, training 1.
    pub fn slot(self) -> usize {
        match self {
            Split::Valid => 0,
            Split::Train => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Split::Valid => "valid",
            Split::Train => "train",
        }
    }
}

/// Widths of the recorded model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dims {
    pub hidden_size: usize,
    pub ffn_dim: usize,
    pub num_heads: usize,
    pub num_layers: usize,
}

impl Dims {
    /// Bytes one row costs in a shard, all layers.
    pub fn row_bytes(&self) -> usize {
        let per_layer = 2 * self.hidden_size * 2 + packed_len(self.ffn_dim) + self.num_heads * 2;
        per_layer * self.num_layers + 8
    }
}

/// The settings of a recording (`plan.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordingPlan {
    pub format: u32,
    /// The model folder as given, and the content hash that identifies it.
    pub model: String,
    pub model_hash: String,
    pub dims: Dims,
    /// The calibration text and its size in bytes.
    pub text: String,
    pub text_bytes: u64,
    /// Documents are cut to this many tokens (`</s>` included).
    pub max_document_tokens: usize,
    /// Documents run at lengths rounded up to a multiple of this (padding after the text,
    /// not recorded).
    pub length_bucket: usize,
    pub train_rows: usize,
    pub valid_rows: usize,
    pub shard_rows: usize,
    /// 0: a layer's inputs predict that layer; 1: layer l's inputs predict layer l + 1.
    pub lookahead: usize,
    /// dtype the model ran in (recorded values are stored as F16 whatever it is).
    pub compute_dtype: String,
}

impl RecordingPlan {
    /// Rows planned for `split`.
    pub fn rows(&self, split: Split) -> usize {
        match split {
            Split::Valid => self.valid_rows,
            Split::Train => self.train_rows,
        }
    }
}

/// One input/label pairing that training uses (see [`pairs`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pair {
    /// `mlp` or `attention`.
    pub predictor: String,
    /// The layer whose neurons or heads are predicted.
    pub layer: usize,
    /// Shard tensor read as the predictor's input.
    pub input: String,
    /// Shard tensor its labels come from.
    pub label: String,
}

/// What a complete shard says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMeta {
    pub split: Split,
    pub index: usize,
    pub rows: usize,
    /// Where the rows after this shard start: document index (among non-blank documents)
    /// and token position in it.
    pub next_document: usize,
    pub next_position: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    #[serde(flatten)]
    pub meta: ShardMeta,
}

/// `recording.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordingManifest {
    pub plan: RecordingPlan,
    /// Rows recorded per split (fewer than planned when the text ran out).
    pub train_rows: usize,
    pub valid_rows: usize,
    /// Documents the rows came from, per split.
    pub train_documents: usize,
    pub valid_documents: usize,
    pub pairs: Vec<Pair>,
    pub shards: Vec<ShardEntry>,
}

/// The pairings for a lookahead: with lookahead `a`, layer `L`'s MLP predictor reads layer
/// `L − a`'s MLP input and learns layer `L`'s fc1 activity; its attention predictor reads
/// layer `L − a`'s attention input and learns layer `L`'s head norms. With `a = 1` layer 0
/// has no predictors (it runs dense).
pub fn pairs(dims: &Dims, lookahead: usize) -> Vec<Pair> {
    let mut pairs = Vec::new();
    for layer in lookahead..dims.num_layers {
        let source = layer - lookahead;
        pairs.push(Pair {
            predictor: "mlp".into(),
            layer,
            input: format!("layer.{source}.mlp_input"),
            label: format!("layer.{layer}.mlp_active"),
        });
        pairs.push(Pair {
            predictor: "attention".into(),
            layer,
            input: format!("layer.{source}.attention_input"),
            label: format!("layer.{layer}.head_norms"),
        });
    }
    pairs
}

pub fn shard_file(split: Split, index: usize) -> String {
    format!("{}-{index:05}.safetensors", split.name())
}

/// The tensors of a shard of `rows` rows: name, dtype, shape.
pub fn shard_tensors(dims: &Dims, rows: usize) -> Vec<(String, Dtype, Vec<usize>)> {
    let mut t = Vec::new();
    for l in 0..dims.num_layers {
        t.push((format!("layer.{l}.attention_input"), Dtype::F16, vec![rows, dims.hidden_size]));
        t.push((format!("layer.{l}.mlp_input"), Dtype::F16, vec![rows, dims.hidden_size]));
        t.push((format!("layer.{l}.mlp_active"), Dtype::U8, vec![rows, packed_len(dims.ffn_dim)]));
        t.push((format!("layer.{l}.head_norms"), Dtype::F16, vec![rows, dims.num_heads]));
    }
    t.push(("document".into(), Dtype::U32, vec![rows]));
    t.push(("position".into(), Dtype::U32, vec![rows]));
    t
}

/// Writes `bytes` to `path` through `path.tmp`, synced before the rename, so `path` is
/// either absent or complete whatever interrupts the write.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    use std::io::Write;
    let tmp = tmp_path(path);
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| TrainError::Io { path: p, source }
    };
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io(path))
}

pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Serializes a shard; `tensors` must follow [`shard_tensors`].
pub fn serialize_shard(meta: &ShardMeta, tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>) -> Result<Vec<u8>, TrainError> {
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| TrainError::Other(format!("shard tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta_json = serde_json::to_string(meta).map_err(|e| TrainError::Other(e.to_string()))?;
    let info = HashMap::from([(SHARD_META_KEY.to_string(), meta_json)]);
    safetensors::serialize(views, Some(info)).map_err(|e| TrainError::Other(format!("serializing a shard: {e}")))
}

/// A shard opened for reading (memory-mapped), its header checked against the recording's
/// dims: every tensor present with its dtype and shape, the file not truncated.
pub struct Shard {
    pub path: PathBuf,
    pub meta: ShardMeta,
    mmap: memmap2::Mmap,
}

impl Shard {
    pub fn open(path: &Path, dims: &Dims) -> Result<Self, TrainError> {
        let bad = |what: String| TrainError::recording(path, what);
        let file = std::fs::File::open(path).map_err(|source| TrainError::Io { path: path.to_path_buf(), source })?;
        // Safety: recording files are written once (renamed into place when complete) and
        // never modified afterwards.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| TrainError::Io { path: path.to_path_buf(), source })?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| bad(format!("not a readable safetensors shard ({e}); truncated or corrupt — delete it and rerun `record` to redo it")))?;
        let (_, header) = SafeTensors::read_metadata(&mmap).map_err(|e| bad(e.to_string()))?;
        let meta_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(SHARD_META_KEY))
            .ok_or_else(|| bad("no dejavu shard metadata: not a shard of a recording".into()))?;
        let meta: ShardMeta = serde_json::from_str(meta_json).map_err(|e| bad(format!("bad shard metadata: {e}")))?;
        for (name, dtype, shape) in shard_tensors(dims, meta.rows) {
            let view = st.tensor(&name).map_err(|_| bad(format!("tensor {name} is missing")))?;
            if view.dtype() != dtype || view.shape() != shape.as_slice() {
                return Err(bad(format!(
                    "tensor {name} is {:?} {:?}, expected {dtype:?} {shape:?} (a shard of another model?)",
                    view.dtype(),
                    view.shape()
                )));
            }
        }
        drop(st);
        Ok(Self { path: path.to_path_buf(), meta, mmap })
    }

    /// The raw little-endian bytes of a tensor checked by [`Shard::open`].
    pub fn bytes(&self, name: &str) -> Result<&[u8], TrainError> {
        let st = SafeTensors::deserialize(&self.mmap).map_err(|e| TrainError::recording(&self.path, e.to_string()))?;
        st.tensor(name)
            .map(|v| v.data())
            .map_err(|_| TrainError::recording(&self.path, format!("tensor {name} is missing")))
    }
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| TrainError::recording(path, format!("not a valid {}: {e}", path.file_name().unwrap_or_default().to_string_lossy())))
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| TrainError::Other(e.to_string()))? + "\n";
    write_atomically(path, text.as_bytes())
}

impl RecordingManifest {
    /// Reads `dir/recording.json`; a folder without it holds no complete recording.
    pub fn load(dir: &Path) -> Result<Self, TrainError> {
        let path = dir.join(MANIFEST_FILE);
        if !path.is_file() {
            let what = if dir.join(PLAN_FILE).is_file() {
                "no recording.json: the recording is not complete (rerun `dejavu-train record` with the same settings to finish it)"
            } else {
                "no recording.json: not a recording folder"
            };
            return Err(TrainError::recording(dir, what));
        }
        let manifest: Self = read_json(&path)?;
        if manifest.plan.format != FORMAT {
            return Err(TrainError::recording(&path, format!("format {} is not supported (this build reads {FORMAT})", manifest.plan.format)));
        }
        if manifest.pairs != pairs(&manifest.plan.dims, manifest.plan.lookahead) {
            return Err(TrainError::recording(&path, "its input/label pairs do not follow its lookahead"));
        }
        Ok(manifest)
    }

    /// Opens every shard of `split`, checking each against the manifest.
    pub fn open_shards(&self, dir: &Path, split: Split) -> Result<Vec<Shard>, TrainError> {
        self.shards
            .iter()
            .filter(|s| s.meta.split == split)
            .map(|entry| {
                let shard = Shard::open(&dir.join(&entry.file), &self.plan.dims)?;
                if shard.meta != entry.meta {
                    return Err(TrainError::recording(&shard.path, format!("shard metadata {:?} disagrees with recording.json {:?}", shard.meta, entry.meta)));
                }
                Ok(shard)
            })
            .collect()
    }
}
