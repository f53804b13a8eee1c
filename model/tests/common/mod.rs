//! Shared test helpers: the fixture models and their Hugging Face golden outputs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::DType;
use dejavu_model::{load_model, Activation, ForwardHooks, Opt, OptConfig};
use safetensors::SafeTensors;

pub type B = burn::backend::Flex;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub const MODELS: [&str; 2] = ["opt-tiny-preln", "opt-tiny-postln-proj"];
pub const PROMPTS: [&str; 2] = ["short", "wiki128"];

pub fn load(name: &str) -> (OptConfig, Opt<B>) {
    load_model::<B>(&fixtures().join(name), DType::F32, &Default::default())
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

/// What `transformers` 4.40.2 computed for a fixture model (fp32, CPU).
pub struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    pub fn of(name: &str) -> Self {
        let path = fixtures().join(name).join("golden.safetensors");
        Self {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn view(&self, key: &str) -> (Vec<usize>, Vec<u8>, safetensors::Dtype) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(key).unwrap_or_else(|_| panic!("golden has no {key}"));
        (t.shape().to_vec(), t.data().to_vec(), t.dtype())
    }

    pub fn has(&self, key: &str) -> bool {
        SafeTensors::deserialize(&self.bytes).unwrap().tensor(key).is_ok()
    }

    pub fn f32(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let (shape, data, dtype) = self.view(key);
        assert_eq!(dtype, safetensors::Dtype::F32, "{key}");
        let values = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (shape, values)
    }

    pub fn ids(&self, key: &str) -> Vec<u32> {
        let (_, data, dtype) = self.view(key);
        assert_eq!(dtype, safetensors::Dtype::I64, "{key}");
        data.chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect()
    }
}

/// Logits of every position, one token per call: each call is a decode step (on the sparse
/// path, the kernels'), on any backend.
pub fn stepped_logits<Bk: Backend, H: ForwardHooks<Bk> + ?Sized>(model: &Opt<Bk>, hooks: &mut H, ids: &[u32]) -> Vec<f32> {
    let device = model.device();
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    let mut out = Vec::new();
    for t in 0..ids.len() {
        let hidden = model.forward_with(dejavu_model::generate::token_tensor::<Bk>(&ids[t..t + 1], &device), &mut cache, hooks).unwrap();
        out.extend(model.logits(hidden).into_data().convert::<f32>().into_vec::<f32>().unwrap());
    }
    out
}

pub fn to_vec<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Keeps every hidden state and fc1 pre-activation a forward pass shows it.
#[derive(Default)]
pub struct Recorder {
    pub hidden: BTreeMap<usize, Vec<f32>>,
    pub fc1: BTreeMap<usize, Vec<f32>>,
}

impl ForwardHooks<B> for Recorder {
    fn observe(&mut self, activation: Activation<'_, B>) {
        match activation {
            Activation::Hidden { index, value } => {
                self.hidden.insert(index, to_vec(value.clone()));
            }
            Activation::Fc1PreActivation { layer, value } => {
                self.fc1.insert(layer, to_vec(value.clone()));
            }
            _ => {}
        }
    }
}

/// The manifest of predictors of rank `rank` for every layer from `lookahead` on (K half
/// the width, threshold 0), for a model of `config` whose content hash is `hash`.
pub fn random_predictor_manifest(config: &OptConfig, lookahead: usize, hash: &str, rank: usize) -> dejavu_predictor::Manifest {
    use dejavu_predictor::{LayerEntry, Manifest, OutputEntry};
    let entry = |outputs: usize| OutputEntry::unmeasured(rank, Some(outputs / 2), Some(0.0));
    Manifest {
        format: 1,
        model_hash: hash.to_string(),
        hidden_size: config.hidden_size,
        ffn_dim: config.ffn_dim,
        num_heads: config.num_attention_heads,
        num_layers: config.num_hidden_layers,
        lookahead,
        layers: (0..config.num_hidden_layers)
            .map(|layer| {
                let sparse = layer >= lookahead;
                LayerEntry {
                    layer,
                    mlp: sparse.then(|| entry(config.ffn_dim)),
                    attention: sparse.then(|| entry(config.num_attention_heads)),
                }
            })
            .collect(),
    }
}
