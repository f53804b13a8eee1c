//! PyTorch checkpoints: `pytorch_model.bin` and a sharded `pytorch_model.bin.index.json`
//! load to the same model as `model.safetensors`, and all three match the logits
//! Hugging Face transformers computed (opt-micro, made by fixtures/make_opt_micro.py).

mod common;

use burn::tensor::DType;
use common::*;
use dejavu_model::generate::token_tensor;
use dejavu_model::load_model;

fn logits(folder: &str, ids: &[u32]) -> Vec<f32> {
    let device = Default::default();
    let (_, model) = load_model::<B>(&fixtures().join(folder), DType::F32, &device)
        .unwrap_or_else(|e| panic!("loading {folder}: {e}"));
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    to_vec(model.forward(token_tensor::<B>(ids, &device), &mut cache).unwrap())
}

#[test]
fn bin_and_sharded_bin_match_safetensors_and_hugging_face() {
    let golden = Golden::of("opt-micro");
    let ids = golden.ids("input_ids");
    let (_, want) = golden.f32("logits");
    let from_safetensors = logits("opt-micro", &ids);
    let err = max_abs_diff(&from_safetensors, &want);
    assert!(err < 1e-4, "safetensors vs transformers: max abs err {err}");
    assert_eq!(logits("opt-micro-bin", &ids), from_safetensors);
    assert_eq!(logits("opt-micro-bin-sharded", &ids), from_safetensors);
}
