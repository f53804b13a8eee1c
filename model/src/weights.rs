//! Loading Hugging Face OPT checkpoints: `model.safetensors`, a sharded
//! `model.safetensors.index.json`, `pytorch_model.bin` or its sharded index.
//!
//! Every tensor the configuration implies is checked (present, right shape, float dtype)
//! against the file headers before any data is read, so a bad checkpoint fails with the
//! tensor and file named. The data is then applied by burn-store through one key map
//! ([`key_remapper`]) and the PyTorch → Burn adapter (Linear weights transposed,
//! LayerNorm weight/bias → gamma/beta).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;
use burn_store::{
    KeyRemapper, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, PytorchStore,
    SafetensorsStore,
};

use crate::config::{OptConfig, POSITION_OFFSET};
use crate::error::ModelError;
use crate::opt::Opt;

/// The one table mapping Hugging Face tensor names onto this crate's module tree.
///
/// - `model.decoder.*` → `decoder.*` (some checkpoints already lack the `model.` prefix);
/// - `layers.N.fc1|fc2` → `layers.N.mlp.fc1|fc2` (the MLP is its own module here).
///
/// `lm_head.weight`, where a checkpoint stores it, is the tied `embed_tokens` and unused.
pub fn key_remapper() -> KeyRemapper {
    KeyRemapper::from_patterns(vec![
        (r"^model\.", ""),
        (r"^decoder\.layers\.(\d+)\.(fc1|fc2)\.", "decoder.layers.${1}.mlp.${2}."),
    ])
    .expect("static patterns are valid regexes")
}

/// Tensor name as found in a checkpoint → the canonical Hugging Face name without the
/// `model.` prefix (`decoder.layers.0.fc1.weight`).
fn canonical_name(name: &str) -> &str {
    name.strip_prefix("model.").unwrap_or(name)
}

/// Every tensor a checkpoint of this configuration must hold, with its Hugging Face
/// shape (Linear weights `[out, in]`). Names are canonical (no `model.` prefix).
pub fn expected_tensors(config: &OptConfig) -> BTreeMap<String, Vec<usize>> {
    let d = config.hidden_size;
    let e = config.embed_dim();
    let ffn = config.ffn_dim;
    let mut expected = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>| {
        expected.insert(name, shape);
    };
    let affine = config.layer_norm_elementwise_affine;
    let layer_norm = |prefix: String, put: &mut dyn FnMut(String, Vec<usize>)| {
        if affine {
            put(format!("{prefix}.weight"), vec![d]);
            put(format!("{prefix}.bias"), vec![d]);
        }
    };
    put("decoder.embed_tokens.weight".into(), vec![config.vocab_size, e]);
    put(
        "decoder.embed_positions.weight".into(),
        vec![config.max_position_embeddings + POSITION_OFFSET, d],
    );
    if config.has_projections() {
        put("decoder.project_in.weight".into(), vec![d, e]);
        put("decoder.project_out.weight".into(), vec![e, d]);
    }
    if config.has_final_layer_norm() {
        layer_norm("decoder.final_layer_norm".into(), &mut put);
    }
    for i in 0..config.num_hidden_layers {
        let p = format!("decoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            put(format!("{p}.self_attn.{proj}.weight"), vec![d, d]);
            if config.enable_bias {
                put(format!("{p}.self_attn.{proj}.bias"), vec![d]);
            }
        }
        put(format!("{p}.fc1.weight"), vec![ffn, d]);
        put(format!("{p}.fc2.weight"), vec![d, ffn]);
        if config.enable_bias {
            put(format!("{p}.fc1.bias"), vec![ffn]);
            put(format!("{p}.fc2.bias"), vec![d]);
        }
        layer_norm(format!("{p}.self_attn_layer_norm"), &mut put);
        layer_norm(format!("{p}.final_layer_norm"), &mut put);
    }
    expected
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Safetensors,
    Pytorch,
}

/// The weight files of a model folder, in load order.
#[derive(Debug, Clone)]
pub struct WeightFiles {
    format: Format,
    pub files: Vec<PathBuf>,
}

impl WeightFiles {
    /// Finds the checkpoint in `dir`, preferring safetensors.
    pub fn find(dir: &Path) -> Result<Self, ModelError> {
        let candidates = [
            ("model.safetensors", Format::Safetensors, false),
            ("model.safetensors.index.json", Format::Safetensors, true),
            ("pytorch_model.bin", Format::Pytorch, false),
            ("pytorch_model.bin.index.json", Format::Pytorch, true),
        ];
        for (name, format, sharded) in candidates {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let files = if sharded {
                shards_of_index(&path)?
            } else {
                vec![path]
            };
            return Ok(Self { format, files });
        }
        Err(ModelError::NoWeights {
            dir: dir.to_path_buf(),
        })
    }
}

/// The shard files an `*.index.json` names, in first-seen order.
fn shards_of_index(index: &Path) -> Result<Vec<PathBuf>, ModelError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| ModelError::WeightFile {
        path: index.to_path_buf(),
        message: format!("not a valid shard index: {e}"),
    })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut seen = BTreeSet::new();
    let mut files = Vec::new();
    for file in parsed.weight_map.values() {
        if seen.insert(file.clone()) {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(ModelError::WeightFile {
                    path: index.to_path_buf(),
                    message: format!("names shard {file}, which does not exist"),
                });
            }
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(ModelError::WeightFile {
            path: index.to_path_buf(),
            message: "weight_map is empty".into(),
        });
    }
    Ok(files)
}

fn safetensors_store(path: &Path) -> SafetensorsStore {
    SafetensorsStore::from_file(path)
}

fn pytorch_store(path: &Path) -> PytorchStore {
    PytorchStore::from_file(path)
}

/// Header facts of one tensor: where it is, its shape and dtype.
#[derive(Debug, Clone)]
struct TensorInfo {
    file: PathBuf,
    shape: Vec<usize>,
    dtype: DType,
}

/// Reads the tensor headers of every file (no tensor data), keyed by canonical name.
fn read_headers(files: &WeightFiles) -> Result<BTreeMap<String, TensorInfo>, ModelError> {
    let mut infos = BTreeMap::new();
    for file in &files.files {
        let fail = |message: String| ModelError::WeightFile {
            path: file.clone(),
            message,
        };
        let mut collect = |snapshots: &BTreeMap<String, burn_store::TensorSnapshot>| {
            for (name, snapshot) in snapshots {
                infos.insert(
                    canonical_name(name).to_string(),
                    TensorInfo {
                        file: file.clone(),
                        shape: snapshot.shape.to_vec(),
                        dtype: snapshot.dtype,
                    },
                );
            }
        };
        match files.format {
            Format::Safetensors => {
                check_safetensors_length(file)?;
                let mut store = safetensors_store(file);
                collect(store.get_all_snapshots().map_err(|e| fail(e.to_string()))?);
            }
            Format::Pytorch => {
                let mut store = pytorch_store(file);
                collect(store.get_all_snapshots().map_err(|e| fail(e.to_string()))?);
            }
        }
    }
    Ok(infos)
}

/// A safetensors file is an 8-byte header length, a JSON header and the tensor bytes; a
/// file cut short is caught here with a plain message rather than deep in a memory map.
fn check_safetensors_length(path: &Path) -> Result<(), ModelError> {
    use std::io::Read;
    let fail = |message: String| ModelError::WeightFile {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let actual = file
        .metadata()
        .map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| fail(format!("truncated: {actual} bytes, too short for a safetensors header")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100_000_000 || 8 + header_len > actual {
        return Err(fail(format!(
            "truncated or not safetensors: header claims {header_len} bytes, file has {actual}"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| fail(format!("cannot read header: {e}")))?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| fail(format!("header is not valid JSON: {e}")))?;
    let data_end = header
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    let needed = 8 + header_len + data_end;
    if actual < needed {
        return Err(fail(format!(
            "truncated: {actual} bytes, the header describes {needed}"
        )));
    }
    Ok(())
}

/// Checks that every expected tensor is present with its shape and a float dtype.
fn validate(
    config: &OptConfig,
    files: &WeightFiles,
    found: &BTreeMap<String, TensorInfo>,
) -> Result<(), ModelError> {
    for (name, shape) in expected_tensors(config) {
        let Some(info) = found.get(&name) else {
            return Err(ModelError::MissingTensor {
                tensor: format!("model.{name}"),
                files: files.files.clone(),
            });
        };
        if info.shape != shape {
            return Err(ModelError::WrongShape {
                tensor: format!("model.{name}"),
                path: info.file.clone(),
                expected: shape,
                found: info.shape.clone(),
            });
        }
        if !matches!(info.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(ModelError::WrongDtype {
                tensor: format!("model.{name}"),
                path: info.file.clone(),
                found: format!("{:?}", info.dtype),
            });
        }
    }
    Ok(())
}

/// A content hash of a model folder: SHA-256 over `config.json` and every weight file
/// (each preceded by its name and length), as `sha256:<hex>`. Predictors and recordings
/// carry it so that they are never applied to a model they were not made from.
pub fn content_hash(dir: &Path) -> Result<String, ModelError> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut files = vec![dir.join("config.json")];
    files.extend(WeightFiles::find(dir)?.files);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for path in files {
        let io = |source| ModelError::Io { path: path.clone(), source };
        let mut file = std::fs::File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        hasher.update(name.as_bytes());
        hasher.update(len.to_le_bytes());
        loop {
            let n = file.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    let digest = hasher.finalize();
    Ok(format!("sha256:{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// The bundled model folder, `assets/opt-mini`: `DEJAVU_MODEL` if set, else next to the
/// sources when built from this checkout, else relative to the working directory (a
/// copied checkout).
pub fn default_model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DEJAVU_MODEL") {
        return dir.into();
    }
    bundled("opt-mini")
}

/// A folder bundled in `assets/` of this checkout: next to the sources when built from it,
/// else relative to the working directory (a copied checkout, such as the device machine's).
fn bundled(name: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets").join(name);
    if built.is_dir() {
        built
    } else {
        Path::new("assets").join(name)
    }
}

/// The predictors trained for the bundled model, `assets/opt-mini-predictors`.
pub fn default_predictors_dir() -> PathBuf {
    bundled("opt-mini-predictors")
}

/// The shared assets (evaluation text, tasks, calibration corpus): `DEJAVU_ASSETS` if set,
/// else `../shared` beside this checkout, else `../shared` from the working directory.
pub fn shared_assets_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DEJAVU_ASSETS") {
        return dir.into();
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    if built.is_dir() {
        built
    } else {
        PathBuf::from("../shared")
    }
}

/// Reads `config.json` from a model folder.
pub fn load_config(dir: &Path) -> Result<OptConfig, ModelError> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(ModelError::Config {
            path: Some(path),
            message: "file not found (is this a Hugging Face OPT model folder?)".into(),
        });
    }
    OptConfig::from_file(&path)
}

/// Loads an OPT model folder (`config.json` plus weights) onto `device`, in `dtype`.
pub fn load_model<B: Backend>(
    dir: &Path,
    dtype: DType,
    device: &B::Device,
) -> Result<(OptConfig, Opt<B>), ModelError> {
    let config = load_config(dir)?;
    let files = WeightFiles::find(dir)?;
    let model = load_weights(&config, &files, dtype, device)?;
    Ok((config, model))
}

/// Builds a model of `config` and fills it from `files`.
pub fn load_weights<B: Backend>(
    config: &OptConfig,
    files: &WeightFiles,
    dtype: DType,
    device: &B::Device,
) -> Result<Opt<B>, ModelError> {
    let headers = read_headers(files)?;
    validate(config, files, &headers)?;

    let mut model = Opt::<B>::new(config, device);
    let mut applied = BTreeSet::new();
    for file in &files.files {
        let fail = |message: String| ModelError::WeightFile {
            path: file.clone(),
            message,
        };
        let result = match files.format {
            Format::Safetensors => {
                let mut store = safetensors_store(file)
                    .remap(key_remapper())
                    .with_from_adapter(PyTorchToBurnAdapter)
                    .allow_partial(true);
                model.load_from(&mut store).map_err(|e| fail(e.to_string()))?
            }
            Format::Pytorch => {
                // burn-store always applies the PyTorch → Burn adapter to PyTorch files.
                let mut store = pytorch_store(file)
                    .remap(key_remapper())
                    .allow_partial(true);
                model.load_from(&mut store).map_err(|e| fail(e.to_string()))?
            }
        };
        if let Some(error) = result.errors.first() {
            return Err(fail(error.to_string()));
        }
        applied.extend(result.applied);
    }
    // The headers were validated above, so every expected tensor must have been applied;
    // judge by what was applied, not by burn-store's `unused` list (which also names
    // LayerNorm weights it applied under their alternative names).
    let expected = expected_tensors(config).len();
    if applied.len() != expected {
        return Err(ModelError::WeightFile {
            path: files.files[0].clone(),
            message: format!(
                "{} of {expected} expected tensors were applied to the model",
                applied.len()
            ),
        });
    }
    Ok(model.cast(dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remapper_moves_fc_under_mlp_and_drops_prefix() {
        let r = key_remapper();
        let pairs = r.to_regex_pairs();
        let apply = |name: &str| {
            let mut s = name.to_string();
            for (re, to) in &pairs {
                s = re.replace_all(&s, to.as_str()).into_owned();
            }
            s
        };
        assert_eq!(
            apply("model.decoder.layers.11.fc2.bias"),
            "decoder.layers.11.mlp.fc2.bias"
        );
        assert_eq!(
            apply("decoder.layers.0.self_attn.q_proj.weight"),
            "decoder.layers.0.self_attn.q_proj.weight"
        );
    }

    #[test]
    fn expected_tensor_count_for_pre_and_post_ln() {
        let pre = OptConfig::named("opt-125m").unwrap();
        // 2 embeddings + final LN (2) + 12 × (8 attention + 4 mlp + 4 LN)
        assert_eq!(expected_tensors(&pre).len(), 2 + 2 + 12 * 16);
        let post = OptConfig::named("opt-350m").unwrap();
        // 2 embeddings + 2 projections, no final LN
        assert_eq!(expected_tensors(&post).len(), 2 + 2 + 24 * 16);
    }
}
