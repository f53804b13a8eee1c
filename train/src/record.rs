//! `dejavu-train record`: runs the dense model over calibration text and records, per
//! layer and token, the residuals the predictors read and the labels they learn (see
//! [`crate::recording`] for the folder's layout).
//!
//! Every document runs alone (batch 1, no padding), cut to the plan's token limit and to
//! the rows its split still needs, so a document's values never depend on what was
//! recorded before it: a resumed run recomputes the document it stopped in and produces
//! the same bytes as an uninterrupted one (on the CPU backend; GPU autotuning may pick
//! other kernels in another process, which changes the last bits of some values).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use dejavu_model::{content_hash, load_config, load_model, Activation, ForwardHooks, OptTokenizer};
use half::f16;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use safetensors::Dtype;

use crate::bits::{pack_row, packed_len};
use crate::corpus::open_documents;
use crate::error::TrainError;
use crate::recording::*;

/// OPT's `<pad>`.
const PAD_TOKEN: u32 = 1;

/// What to record.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    pub model: PathBuf,
    pub text: PathBuf,
    pub out: PathBuf,
    pub train_rows: usize,
    pub valid_rows: usize,
    pub max_document_tokens: usize,
    /// Documents run at lengths rounded up to a multiple of this (capped at
    /// `max_document_tokens`), see [`record`].
    pub length_bucket: usize,
    /// Shards are cut at about this many bytes (at least one row).
    pub shard_bytes: usize,
    pub lookahead: usize,
    pub dtype: DType,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Stop (as if interrupted) after writing this many shards in this run: lets tests
    /// exercise resumption without killing a process at a random point.
    pub stop_after_shards: Option<usize>,
}

#[derive(Debug)]
pub enum RecordOutcome {
    Complete(RecordingManifest),
    Stopped { shards_written: usize },
}

/// Rows of the current shard, held until it is full.
struct ShardBuffer {
    dims: Dims,
    attention_input: Vec<Vec<u8>>,
    mlp_input: Vec<Vec<u8>>,
    mlp_active: Vec<Vec<u8>>,
    head_norms: Vec<Vec<u8>>,
    /// (document, position) of each row.
    origin: Vec<(u32, u32)>,
}

impl ShardBuffer {
    fn new(dims: Dims) -> Self {
        let layers = || vec![Vec::new(); dims.num_layers];
        Self { dims, attention_input: layers(), mlp_input: layers(), mlp_active: layers(), head_norms: layers(), origin: Vec::new() }
    }

    fn rows(&self) -> usize {
        self.origin.len()
    }

    /// Removes the first `rows` rows as the tensors of a shard.
    fn take(&mut self, rows: usize) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
        let d = &self.dims;
        let mut out = Vec::new();
        let widths = [d.hidden_size * 2, d.hidden_size * 2, packed_len(d.ffn_dim), d.num_heads * 2];
        for l in 0..d.num_layers {
            let buffers = [&mut self.attention_input[l], &mut self.mlp_input[l], &mut self.mlp_active[l], &mut self.head_norms[l]];
            for (buffer, width) in buffers.into_iter().zip(widths) {
                let rest = buffer.split_off(rows * width);
                out.push(std::mem::replace(buffer, rest));
            }
        }
        let origin: Vec<(u32, u32)> = self.origin.drain(..rows).collect();
        let documents: Vec<u8> = origin.iter().flat_map(|o| o.0.to_le_bytes()).collect();
        let positions: Vec<u8> = origin.iter().flat_map(|o| o.1.to_le_bytes()).collect();
        out.push(documents);
        out.push(positions);
        shard_tensors(d, rows)
            .into_iter()
            .zip(out)
            .map(|((name, dtype, shape), data)| (name, dtype, shape, data))
            .collect()
    }
}

/// Forward hooks that copy a document's activations to the host.
struct Capture {
    /// Rows kept: positions `first..last` of the forward pass.
    first: usize,
    last: usize,
    attention_input: Vec<Vec<u8>>,
    mlp_input: Vec<Vec<u8>>,
    mlp_active: Vec<Vec<u8>>,
    head_norms: Vec<Vec<u8>>,
}

fn f16_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect()
}

fn host_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().expect("converted to f32")
}

impl<B: Backend> ForwardHooks<B> for Capture {
    fn observe(&mut self, activation: Activation<'_, B>) {
        let (first, n) = (self.first, self.last);
        match activation {
            Activation::AttentionInput { layer, value } | Activation::MlpInput { layer, value } => {
                let [_, _, d] = value.dims();
                let rows = host_f32(value.clone().slice([0..1, first..n, 0..d]));
                let target = match activation {
                    Activation::AttentionInput { .. } => &mut self.attention_input[layer],
                    _ => &mut self.mlp_input[layer],
                };
                *target = f16_bytes(&rows);
            }
            Activation::HeadOutputs { layer, value } => {
                // [1, heads, n, head_dim] → per (position, head) L2 norm, in f32.
                let [_, h, _, hd] = value.dims();
                let v = value.clone().slice([0..1, 0..h, first..n, 0..hd]).cast(DType::F32);
                let norms = v.powi_scalar(2).sum_dim(3).sqrt().reshape([h, n - first]).swap_dims(0, 1);
                self.head_norms[layer] = f16_bytes(&host_f32(norms));
            }
            Activation::Fc1PreActivation { layer, value } => {
                let [_, _, ffn] = value.dims();
                let active = value.clone().slice([0..1, first..n, 0..ffn]).greater_elem(0.0);
                let active: Vec<bool> = active.into_data().convert::<bool>().into_vec::<bool>().expect("bool data");
                let mut packed = Vec::with_capacity((n - first) * packed_len(ffn));
                for row in active.chunks(ffn) {
                    pack_row(row, &mut packed);
                }
                self.mlp_active[layer] = packed;
            }
            Activation::Hidden { .. } => {}
        }
    }
}

/// Where recording stands: per split (indexed by [`Split::slot`]) the rows written, the
/// next shard index and the documents the rows came from; and the document and position
/// the next rows start at.
#[derive(Debug, Default, Clone)]
struct Cursor {
    rows: [usize; 2],
    next_index: [usize; 2],
    documents: [std::collections::BTreeSet<u32>; 2],
    document: usize,
    position: usize,
}

/// Checks the complete shards already in `out` (each opened once) and returns them with
/// the cursor after the last one. Leftover temporary files of an interrupted write are
/// removed.
fn scan_existing(out: &Path, plan: &RecordingPlan) -> Result<(Vec<ShardEntry>, Cursor), TrainError> {
    let mut entries = Vec::new();
    let mut cursor = Cursor::default();
    for entry in std::fs::read_dir(out).map_err(|source| TrainError::Io { path: out.to_path_buf(), source })? {
        let path = entry.map_err(|source| TrainError::Io { path: out.to_path_buf(), source })?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            std::fs::remove_file(&path).map_err(|source| TrainError::Io { path: path.clone(), source })?;
        }
    }
    for split in [Split::Valid, Split::Train] {
        let mut index = 0;
        loop {
            let file = shard_file(split, index);
            let path = out.join(&file);
            if !path.exists() {
                break;
            }
            let shard = Shard::open(&path, &plan.dims)?;
            if shard.meta.split != split || shard.meta.index != index {
                return Err(TrainError::recording(&path, "its metadata names another split or index"));
            }
            cursor.rows[split.slot()] += shard.meta.rows;
            for chunk in shard.bytes("document")?.chunks(4) {
                cursor.documents[split.slot()].insert(u32::from_le_bytes(chunk.try_into().expect("4 bytes")));
            }
            cursor.document = shard.meta.next_document;
            cursor.position = shard.meta.next_position;
            entries.push(ShardEntry { file, meta: shard.meta });
            index += 1;
        }
        cursor.next_index[split.slot()] = index;
    }
    if cursor.next_index[1] > 0 && cursor.rows[0] < plan.valid_rows && cursor.next_index[0] > 0 {
        // Training shards exist although validation is short: only possible when the
        // text ran out during validation, which the manifest would have recorded.
        return Err(TrainError::recording(out, "training shards exist but the validation split is incomplete"));
    }
    Ok((entries, cursor))
}

fn plan_for(options: &RecordOptions) -> Result<RecordingPlan, TrainError> {
    let config = load_config(&options.model)?;
    let dims = Dims {
        hidden_size: config.hidden_size,
        ffn_dim: config.ffn_dim,
        num_heads: config.num_attention_heads,
        num_layers: config.num_hidden_layers,
    };
    if options.lookahead > 1 {
        return Err(TrainError::Other(format!("lookahead {} is not 0 or 1", options.lookahead)));
    }
    if options.max_document_tokens == 0 || options.max_document_tokens > config.max_position_embeddings {
        return Err(TrainError::Other(format!(
            "--max-document-tokens {} must be between 1 and the model's {} positions",
            options.max_document_tokens, config.max_position_embeddings
        )));
    }
    if options.length_bucket == 0 {
        return Err(TrainError::Other("--length-bucket must be positive".into()));
    }
    if options.train_rows == 0 {
        return Err(TrainError::Other("--rows must be positive".into()));
    }
    let text_bytes = std::fs::metadata(&options.text)
        .map_err(|source| TrainError::Io { path: options.text.clone(), source })?
        .len();
    Ok(RecordingPlan {
        format: FORMAT,
        model: options.model.display().to_string(),
        model_hash: content_hash(&options.model)?,
        dims,
        text: options.text.display().to_string(),
        text_bytes,
        max_document_tokens: options.max_document_tokens,
        length_bucket: options.length_bucket,
        train_rows: options.train_rows,
        valid_rows: options.valid_rows,
        shard_rows: (options.shard_bytes / dims.row_bytes()).max(1),
        lookahead: options.lookahead,
        compute_dtype: format!("{:?}", options.dtype).to_lowercase(),
    })
}

/// Compares a stored plan with this run's, naming the settings that differ.
fn check_same_plan(path: &Path, stored: &RecordingPlan, plan: &RecordingPlan) -> Result<(), TrainError> {
    if stored == plan {
        return Ok(());
    }
    let a = serde_json::to_value(stored).map_err(|e| TrainError::Other(e.to_string()))?;
    let b = serde_json::to_value(plan).map_err(|e| TrainError::Other(e.to_string()))?;
    let differing: Vec<String> = match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => a
            .iter()
            .filter(|(k, v)| b.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: {v} there, {} now", b.get(k).cloned().unwrap_or_default()))
            .collect(),
        _ => vec![],
    };
    Err(TrainError::recording(
        path,
        format!("this folder holds a recording made with other settings ({}); use another --out folder", differing.join("; ")),
    ))
}

/// Refuses to start when the disk holding `out` cannot take the rest of the recording.
fn check_disk(out: &Path, bytes_needed: u64) -> Result<(), TrainError> {
    let free = fs4::available_space(out).map_err(|source| TrainError::Io { path: out.to_path_buf(), source })?;
    // Room for one shard's temporary copy beyond the estimate.
    if bytes_needed > free {
        return Err(TrainError::recording(
            out,
            format!("the recording needs about {:.2} GB more but the disk has {:.2} GB free", bytes_needed as f64 / 1e9, free as f64 / 1e9),
        ));
    }
    Ok(())
}

struct ShardWriter<'a> {
    out: &'a Path,
    written_now: usize,
    stop_after: Option<usize>,
}

impl ShardWriter<'_> {
    /// Writes the first `rows` buffered rows as the next shard of `split`; `next` is where
    /// the rows after them start. Returns whether to stop here (see
    /// [`RecordOptions::stop_after_shards`]).
    fn flush(
        &mut self,
        buffer: &mut ShardBuffer,
        split: Split,
        rows: usize,
        next: (usize, usize),
        cursor: &mut Cursor,
        shards: &mut Vec<ShardEntry>,
    ) -> Result<bool, TrainError> {
        let slot = split.slot();
        let meta = ShardMeta { split, index: cursor.next_index[slot], rows, next_document: next.0, next_position: next.1 };
        let file = shard_file(split, meta.index);
        let bytes = serialize_shard(&meta, buffer.take(rows))?;
        write_atomically(&self.out.join(&file), &bytes)?;
        cursor.next_index[slot] += 1;
        cursor.rows[slot] += rows;
        cursor.document = next.0;
        cursor.position = next.1;
        tracing::info!(
            "wrote {file}: {rows} rows; {} validation and {} training rows so far",
            cursor.rows[0],
            cursor.rows[1]
        );
        shards.push(ShardEntry { file, meta });
        self.written_now += 1;
        Ok(self.stop_after.is_some_and(|n| self.written_now >= n))
    }
}

/// Records (or resumes recording) into `options.out`.
pub fn record<B: Backend>(options: &RecordOptions, device: &B::Device) -> Result<RecordOutcome, TrainError> {
    let plan = plan_for(options)?;
    let out = &options.out;
    std::fs::create_dir_all(out).map_err(|source| TrainError::Io { path: out.clone(), source })?;
    let plan_path = out.join(PLAN_FILE);
    if plan_path.exists() {
        let stored: RecordingPlan = read_json(&plan_path)?;
        check_same_plan(&plan_path, &stored, &plan)?;
        if out.join(MANIFEST_FILE).exists() {
            let manifest = RecordingManifest::load(out)?;
            tracing::info!("{} already holds this complete recording", out.display());
            return Ok(RecordOutcome::Complete(manifest));
        }
    } else {
        write_json(&plan_path, &plan)?;
    }
    let (mut shards, mut cursor) = scan_existing(out, &plan)?;
    let dims = plan.dims;
    let total_rows = plan.train_rows + plan.valid_rows;
    let done_rows = cursor.rows[0] + cursor.rows[1];
    let bytes_needed = ((total_rows - done_rows.min(total_rows)) as u64 + plan.shard_rows as u64) * dims.row_bytes() as u64;
    check_disk(out, bytes_needed)?;
    if done_rows > 0 {
        tracing::info!("resuming {}: {done_rows} rows in {} complete shards", out.display(), shards.len());
    }

    let tokenizer = OptTokenizer::from_dir(&options.model)?;
    let (_, model) = load_model::<B>(&options.model, options.dtype, device)?;

    let bar = if options.progress { ProgressBar::new(total_rows as u64) } else { ProgressBar::with_draw_target(Some(total_rows as u64), ProgressDrawTarget::hidden()) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} recording [{elapsed_precise}] {wide_bar} {pos}/{len} rows ({per_sec}, ETA {eta}) {msg}")
            .expect("valid template"),
    );
    bar.set_message(format!("~{:.2} GB", total_rows as f64 * dims.row_bytes() as f64 / 1e9));
    bar.set_position(done_rows as u64);

    let mut buffer = ShardBuffer::new(dims);
    let start = Instant::now();
    let mut computed_tokens = 0usize;

    let mut split = if cursor.rows[0] >= plan.valid_rows { Split::Train } else { Split::Valid };

    let mut writer = ShardWriter { out, written_now: 0, stop_after: options.stop_after_shards };
    let documents = open_documents(&options.text)?;
    'documents: for (index, document) in documents.enumerate().skip(cursor.document) {
        if split == Split::Train && cursor.rows[1] >= plan.train_rows {
            break;
        }
        let text = document?;
        let skip = if index == cursor.document { cursor.position } else { 0 };
        // Only the text that can reach the token limit is encoded (a BPE token spans far
        // fewer than 64 characters).
        let cut = text.char_indices().nth(options.max_document_tokens * 64).map_or(text.len(), |(i, _)| i);
        let mut tokens = tokenizer.encode(&text[..cut])?;
        tokens.truncate(plan.max_document_tokens);
        let done = cursor.rows[split.slot()] + buffer.rows();
        let end = tokens.len().min(skip + (plan.rows(split) - done));
        if end <= skip {
            continue;
        }
        tokens.truncate(end);
        // Run at a length rounded up to a multiple of the bucket (within the token limit),
        // padded with OPT's pad token after the text: causal attention keeps the kept rows
        // independent of the padding, and GPU backends then see a handful of shapes instead
        // of one per document (each new matmul shape costs seconds of autotuning).
        let bucket = plan.length_bucket;
        let run_len = end.div_ceil(bucket).saturating_mul(bucket).min(plan.max_document_tokens).max(end);
        tokens.resize(run_len, PAD_TOKEN);

        let mut capture = Capture {
            first: skip,
            last: end,
            attention_input: vec![Vec::new(); dims.num_layers],
            mlp_input: vec![Vec::new(); dims.num_layers],
            mlp_active: vec![Vec::new(); dims.num_layers],
            head_norms: vec![Vec::new(); dims.num_layers],
        };
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, run_len]), device);
        let mut cache = model.new_cache(1, run_len)?;
        model.forward_with(input, &mut cache, &mut capture)?;
        computed_tokens += end;
        for l in 0..dims.num_layers {
            buffer.attention_input[l].append(&mut capture.attention_input[l]);
            buffer.mlp_input[l].append(&mut capture.mlp_input[l]);
            buffer.mlp_active[l].append(&mut capture.mlp_active[l]);
            buffer.head_norms[l].append(&mut capture.head_norms[l]);
        }
        buffer.origin.extend((skip..end).map(|p| (index as u32, p as u32)));
        cursor.documents[split.slot()].insert(index as u32);
        bar.inc((end - skip) as u64);
        bar.set_message(format!("{:.0} tokens/s computed", computed_tokens as f64 / start.elapsed().as_secs_f64()));

        let split_done = done + (end - skip) >= plan.rows(split);
        while buffer.rows() >= plan.shard_rows {
            let rows = plan.shard_rows;
            let next = if buffer.rows() > rows {
                let (d, p) = buffer.origin[rows];
                (d as usize, p as usize)
            } else if split_done {
                (index + 1, 0)
            } else {
                (index, end)
            };
            if writer.flush(&mut buffer, split, rows, next, &mut cursor, &mut shards)? {
                bar.abandon();
                return Ok(RecordOutcome::Stopped { shards_written: writer.written_now });
            }
        }
        if split_done {
            if buffer.rows() > 0 {
                let rows = buffer.rows();
                if writer.flush(&mut buffer, split, rows, (index + 1, 0), &mut cursor, &mut shards)? {
                    bar.abandon();
                    return Ok(RecordOutcome::Stopped { shards_written: writer.written_now });
                }
            }
            if split == Split::Train {
                break 'documents;
            }
            split = Split::Train;
        }
    }
    if buffer.rows() > 0 {
        // The text ran out with a partial shard left.
        let rows = buffer.rows();
        let next = buffer.origin.last().map(|&(d, _)| (d as usize + 1, 0)).unwrap_or((0, 0));
        writer.flush(&mut buffer, split, rows, next, &mut cursor, &mut shards)?;
    }
    bar.finish();
    if cursor.rows[0] < plan.valid_rows || cursor.rows[1] < plan.train_rows {
        tracing::warn!(
            "{} ran out of documents: {} validation and {} training rows recorded of {} and {} planned",
            options.text.display(),
            cursor.rows[0],
            cursor.rows[1],
            plan.valid_rows,
            plan.train_rows
        );
    }
    if cursor.rows[1] == 0 {
        return Err(TrainError::Input { path: options.text.clone(), what: "no training rows: the text has too few documents".into() });
    }
    let manifest = RecordingManifest {
        train_rows: cursor.rows[1],
        valid_rows: cursor.rows[0],
        train_documents: cursor.documents[1].len(),
        valid_documents: cursor.documents[0].len(),
        pairs: pairs(&dims, plan.lookahead),
        shards,
        plan,
    };
    write_json(&out.join(MANIFEST_FILE), &manifest)?;
    Ok(RecordOutcome::Complete(manifest))
}
