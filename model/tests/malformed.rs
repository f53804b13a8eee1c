//! Malformed checkpoints and inputs: each a clear error naming the file and the problem,
//! never a panic. Also: sharded safetensors load to the same model as a single file.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use common::*;
use dejavu_model::generate::token_tensor;
use dejavu_model::{generate, load_model, Dense, GenerateOptions, ModelError, Sampling};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

const MODEL: &str = "opt-tiny-preln";

/// (name, dtype, shape, bytes) of every tensor of a safetensors file.
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn read_tensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write_tensors(path: &Path, tensors: &Tensors) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A copy of the fixture model folder whose weights `edit` rewrites.
fn model_with(edit: impl FnOnce(&mut Tensors)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join(MODEL);
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors = read_tensors(&src.join("model.safetensors"));
    edit(&mut tensors);
    write_tensors(&dir.path().join("model.safetensors"), &tensors);
    dir
}

fn load_err(dir: &Path) -> String {
    match load_model::<B>(dir, DType::F32, &Default::default()) {
        Ok(_) => panic!("{} loaded without error", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn weights_path(dir: &Path) -> String {
    dir.join("model.safetensors").display().to_string()
}

#[test]
fn truncated_safetensors() {
    let dir = model_with(|_| {});
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("truncated") && err.contains(&weights_path(dir.path())), "{err}");

    // Cut inside the header too.
    std::fs::write(&path, &bytes[..5]).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn missing_tensor() {
    let name = "model.decoder.layers.1.fc2.bias";
    let dir = model_with(|t| t.retain(|(n, ..)| n != name));
    let err = load_err(dir.path());
    assert!(err.contains(name) && err.contains("missing"), "{err}");
    assert!(err.contains(&weights_path(dir.path())), "{err}");
}

#[test]
fn wrong_shape() {
    let name = "model.decoder.layers.0.fc1.weight";
    let dir = model_with(|t| {
        let entry = t.iter_mut().find(|(n, ..)| n == name).unwrap();
        entry.2 = vec![255, 64];
        entry.3.truncate(255 * 64 * 4);
    });
    let err = load_err(dir.path());
    assert!(err.contains(name) && err.contains("[255, 64]") && err.contains("[256, 64]"), "{err}");
    assert!(err.contains(&weights_path(dir.path())), "{err}");
}

#[test]
fn wrong_dtype() {
    let name = "model.decoder.layers.0.fc1.bias";
    let dir = model_with(|t| {
        let entry = t.iter_mut().find(|(n, ..)| n == name).unwrap();
        entry.1 = Dtype::I32;
    });
    let err = load_err(dir.path());
    assert!(err.contains(name) && err.contains("dtype"), "{err}");
}

#[test]
fn bad_config_values() {
    let dir = model_with(|_| {});
    let config = dir.path().join("config.json");
    let original = std::fs::read_to_string(&config).unwrap();

    std::fs::write(&config, original.replace("\"relu\"", "\"gelu\"")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json") && err.contains("gelu"), "{err}");

    std::fs::write(&config, original.replace("\"hidden_size\": 64", "\"hidden_size\": \"wide\"")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json") && err.contains("hidden_size"), "{err}");

    // A config that does not match the weights is a shape error, not garbage.
    std::fs::write(&config, original.replace("\"ffn_dim\": 256", "\"ffn_dim\": 128")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("layers.0.fc1.") && err.contains("expected [128"), "{err}");

    std::fs::remove_file(&config).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json") && err.contains("not found"), "{err}");
}

#[test]
fn no_weights() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join(MODEL).join("config.json"), dir.path().join("config.json")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("no weights") && err.contains("model.safetensors"), "{err}");
}

#[test]
fn prompt_longer_than_2048_positions() {
    let (_, model) = load(MODEL);
    let prompt: Vec<u32> = (0..2049).map(|i| 3 + i % 1000).collect();
    let options = GenerateOptions {
        max_new_tokens: 1,
        sampling: Sampling::Greedy,
        eos_token: None,
    };
    let err = generate(&model, &mut Dense, &prompt, &options, |_| true).unwrap_err();
    assert!(matches!(err, ModelError::ContextTooLong { requested: 2050, limit: 2048 }), "{err}");
    assert!(err.to_string().contains("2048"), "{err}");

    // A prompt that fits but leaves no room for the new tokens.
    let options = GenerateOptions { max_new_tokens: 10, ..options };
    let err = generate(&model, &mut Dense, &prompt[..2040], &options, |_| true).unwrap_err();
    assert!(err.to_string().contains("2050 positions exceeds"), "{err}");

    // The forward pass checks too, before any work.
    let err = model.new_cache(1, 2049).unwrap_err();
    assert!(err.to_string().contains("2048"), "{err}");
}

#[test]
fn sharded_safetensors_load_like_one_file() {
    let src = fixtures().join(MODEL);
    let tensors = read_tensors(&src.join("model.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    let mut map = serde_json::Map::new();
    for (part, file) in [first, second].into_iter().zip(names) {
        write_tensors(&dir.path().join(file), &part.to_vec());
        for (n, ..) in part {
            map.insert(n.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();

    let device = Default::default();
    let ids = Golden::of(MODEL).ids("short.input_ids");
    let logits = |d: &PathBuf| {
        let (_, m) = load_model::<B>(d, DType::F32, &device).unwrap();
        let mut cache = m.new_cache(1, ids.len()).unwrap();
        to_vec(m.forward(token_tensor::<B>(&ids, &device), &mut cache).unwrap())
    };
    assert_eq!(logits(&dir.path().to_path_buf()), logits(&src));

    // A shard named in the index but absent.
    std::fs::remove_file(dir.path().join(names[1])).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains(names[1]) && err.contains("does not exist"), "{err}");
}
